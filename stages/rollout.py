"""Sample a batch of training prompts and generate responses with the current policy,
recording per-token logprobs and values (rollout@i)."""

from minichatgpt.pipeline.inputs import parser, stage_params
from minichatgpt.runtime.stage import run


def main() -> dict:
    p = parser("rollout", __doc__)
    p.add_argument("--iter", type=int, required=True, help="iteration number (1-based)")
    p.add_argument("--policy", required=True, help="checkpoint directory of the previous iteration")
    p.add_argument("--prompts", default="data/prompts.parquet")
    p.add_argument("--out", required=True, help="output rollouts Parquet")
    args = p.parse_args()

    import numpy as np

    from minichatgpt.params import section
    from minichatgpt.pipeline.artifacts import read_table, write_table
    from minichatgpt.ppo.steps import stage_seed
    from minichatgpt.runtime.stage import setup_torch

    raw = stage_params(args)
    ppo, gen, runtime = section(raw, "ppo"), section(raw, "generation"), section(raw, "runtime")
    prompts = read_table(args.prompts, "prompts")
    setup_torch(runtime.threads)

    from minichatgpt.models.policy import load_policy
    from minichatgpt.ppo.steps import rollout, sample_prompts
    from minichatgpt.runtime.device import resolve
    from minichatgpt.runtime.parallel import current_world

    place = resolve(runtime.device, runtime.dtype)
    world = current_world(place.device)
    seed = stage_seed(ppo.seed, "rollout", args.iter)
    batch = sample_prompts(prompts, "train", ppo.batch_size, np.random.default_rng(seed))
    policy, tokenizer, _ = load_policy(args.policy, ppo.seed)
    with place.autocast():
        table = rollout(policy.to(place.device), tokenizer, batch, gen, seed, world=world)
    if not world.is_main:  # process 0 gathered every chunk and writes the table
        return {"iter": args.iter, "rank": world.rank}
    write_table(table, args.out, "rollouts")
    return {"iter": args.iter, "rows": table.num_rows}


if __name__ == "__main__":
    run("rollout", main)
