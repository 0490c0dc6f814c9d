"""Validate every section of params.yaml before any other stage runs (check_params).

DVC deletes a stage's outputs just before running it. Every other stage comes after this one,
so a refused value (a typo, an unknown key added with `-S +section.key=...`, a value out of range,
a hub model or dataset that cannot be downloaded here, a runtime.device this machine does not have)
stops `dvc repro` / `dvc exp run` before any other output is touched. The output lists the
settings the code declares (types, defaults, docs and checks): it changes with the code, never with valid
values, so stages downstream are not invalidated by it.
"""

from minichatgpt.runtime.stage import parser, run


def main() -> dict:
    p = parser("check_params", __doc__)
    p.add_argument("--out", default="data/params_schema.json", help="output: the declared settings")
    args = p.parse_args()

    from minichatgpt.params import ParamsError, declared, load_yaml, validate_all
    from minichatgpt.params.hub import check_reachable
    from minichatgpt.pipeline.artifacts import write_json

    checked = validate_all(load_yaml(args.params))
    runtime = checked["runtime"]
    if (runtime.device, runtime.dtype) != ("cpu", "float32"):  # a GPU this machine lacks: fail before any stage
        from minichatgpt.runtime.device import resolve

        resolve(runtime.device, runtime.dtype)
    unreachable = check_reachable(checked)  # hub names without network: fail now, not after 30 s of retries
    if unreachable:
        raise ParamsError(unreachable)
    write_json(declared(), args.out)
    return {"sections": len(checked) - 1, "iterations": len(checked["iters"])}


if __name__ == "__main__":
    run("check_params", main)
