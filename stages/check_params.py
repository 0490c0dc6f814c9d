"""Validate every section of params.yaml before any other stage runs (check_params).

DVC deletes a stage's outputs just before running it. Every other stage comes after this one,
so a refused value (a typo, an unknown key added with `-S +section.key=...`, a value out of range,
a hub model or dataset that cannot be downloaded here, a runtime.device this machine does not have)
stops `dvc repro` / `dvc exp run` before any other output is touched. The output lists the
settings the code declares (types, defaults, docs and checks): it changes with the code, never with valid
values, so stages downstream are not invalidated by it.

It also checks that iterations/*/dvc.yaml declare the ppo.iterations that params.yaml asks for. DVC read
them before this stage ran, so when they do not (after `-S ppo.iterations=N`, or an edited template) it
writes them and stops: the same command, run again, runs the new pipeline.

Last it writes data/inputs/<stage>.json, the settings and code digests that the iteration stages
depend on instead of params.yaml and the package (minichatgpt.pipeline.inputs says why).
"""

from minichatgpt.runtime.stage import parser, run


def main() -> dict:
    p = parser("check_params", __doc__)
    p.add_argument("--out", default="data/params_schema.json", help="output: the declared settings")
    p.add_argument("--root", default=".", help="the repository whose iterations/*/dvc.yaml to check")
    args = p.parse_args()

    from pathlib import Path

    from minichatgpt.params import ParamsError, declared, load_yaml, validate_all
    from minichatgpt.params.hub import check_reachable
    from minichatgpt.pipeline import inputs
    from minichatgpt.pipeline.artifacts import write_json
    from minichatgpt.pipeline.iterations import write

    raw = load_yaml(args.params)
    checked = validate_all(raw)
    runtime = checked["runtime"]
    if (runtime.device, runtime.dtype) != ("cpu", "float32"):  # a GPU this machine lacks: fail before any stage
        from minichatgpt.runtime.device import resolve

        resolve(runtime.device, runtime.dtype)
    unreachable = check_reachable(checked)  # hub names without network: fail now, not after 30 s of retries
    if unreachable:
        raise ParamsError(unreachable)
    n = checked["ppo"].iterations
    rewritten = write(Path(args.root), n)
    if rewritten:
        raise ParamsError(f"ppo.iterations={n}, but the pipeline's stage files did not declare that run: "
                          f"wrote {', '.join(rewritten)}. DVC read them before this stage; run the same "
                          "command again to run the new pipeline")
    inputs.write_all(Path(args.root), raw)
    write_json(declared(), args.out)
    return {"sections": len(checked), "iterations": n}


if __name__ == "__main__":
    run("check_params", main)
