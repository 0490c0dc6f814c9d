"""Validate every section of params.yaml before any other stage runs (check_params).

DVC deletes a stage's outputs just before running it. Every other stage comes after this one,
so a refused value (a typo, an unknown key added with `-S +section.key=...`, a value out of range)
stops `dvc repro` / `dvc exp run` before any other output is touched. The output lists the
settings the code declares (types and defaults): it changes with the code, never with valid
values, so stages downstream are not invalidated by it.
"""

from minichatgpt.runtime.stage import parser, run


def main() -> dict:
    p = parser("check_params", __doc__)
    p.add_argument("--out", default="data/params_schema.json", help="output: the declared settings")
    args = p.parse_args()

    from minichatgpt.params import ParamsError, declared, load_yaml, validate_all
    from minichatgpt.pipeline.artifacts import write_json

    checked = validate_all(load_yaml(args.params))
    data, gen, pretrain = checked["data"], checked["generation"], checked["pretrain"]
    room = pretrain.n_positions - data.input_max_text_length
    if pretrain.model == "embedded" and gen.output_max_length > room:  # rollout@1 would find out too late
        raise ParamsError(f"params.yaml: generation.output_max_length={gen.output_max_length} is not allowed; "
                          f"expected <= pretrain.n_positions - data.input_max_text_length ({room})")
    write_json(declared(), args.out)
    return {"sections": len(checked) - 1, "iterations": len(checked["iters"])}


if __name__ == "__main__":
    run("check_params", main)
