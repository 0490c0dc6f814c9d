"""Generalised advantage estimation over scored rollouts (advantages@i).

Reads only ``ppo.gamma``, ``ppo.lam`` and ``ppo.whiten_rewards``; imports torch but not transformers,
so it starts in about a second.
"""

from minichatgpt.pipeline.inputs import parser, stage_params
from minichatgpt.runtime.stage import run


def main() -> dict:
    p = parser("advantages", __doc__)
    p.add_argument("--iter", type=int, required=True)
    p.add_argument("--scored", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from minichatgpt.params import section
    from minichatgpt.pipeline.artifacts import read_table, write_table

    ppo = section(stage_params(args), "ppo")
    scored = read_table(args.scored, "scored")

    from minichatgpt.ppo.steps import advantages

    table = advantages(scored, ppo.gamma, ppo.lam, ppo.whiten_rewards)
    write_table(table, args.out, "advantages")
    return {"iter": args.iter, "gamma": ppo.gamma, "lam": ppo.lam}


if __name__ == "__main__":
    run("advantages", main)
