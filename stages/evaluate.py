"""Held-out evaluation: reward of the pretrained policy vs the final one on the same prompts
and seed, KL of the final policy to the reference, before/after samples, and the plot data
that dvc.yaml declares (per-iteration training statistics, held-out reward distribution)."""

from minichatgpt.runtime.stage import parser, run


def main() -> dict:
    p = parser("evaluate", __doc__)
    p.add_argument("--prompts", default="data/prompts.parquet")
    p.add_argument("--checkpoints", default="checkpoints", help="directory of per-iteration checkpoints")
    p.add_argument("--reward", default="models/reward")
    p.add_argument("--summary", default="metrics/summary.json")
    p.add_argument("--samples", default="metrics/samples.json")
    p.add_argument("--iter-metrics", default="metrics/iters", help="directory of update@i metrics JSON files")
    p.add_argument("--iterations", default="metrics/iterations.json", help="output: per-iteration statistics")
    p.add_argument("--distribution", default="metrics/reward_distribution.json",
                   help="output: held-out reward histogram before and after PPO")
    args = p.parse_args()

    import json
    from pathlib import Path

    from minichatgpt.params import iterations, load_yaml, section
    from minichatgpt.pipeline.artifacts import read_table, write_json
    from minichatgpt.ppo.steps import stage_seed
    from minichatgpt.runtime.stage import setup_torch

    raw = load_yaml(args.params)
    params, gen, runtime = section(raw, "evaluate"), section(raw, "generation"), section(raw, "runtime")
    reward_model = section(raw, "reward").model
    last = list(iterations(raw))[-1]
    prompts = read_table(args.prompts, "prompts")
    final_dir = Path(args.checkpoints) / last
    if not (final_dir / "state.json").is_file():
        raise FileNotFoundError(f"{final_dir}: no finished checkpoint of iteration {last}; run `dvc repro`")
    stats = {}
    for key in iterations(raw):
        file = Path(args.iter_metrics) / f"{key}.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: metrics of update@{key} missing; run `dvc repro`")
        stats[key] = json.loads(file.read_text())
    setup_torch(runtime.threads)

    from minichatgpt.models.reward import is_function_ref
    from minichatgpt.pipeline.evaluation import evaluate
    from minichatgpt.pipeline.report import iteration_rows, reward_histogram
    from minichatgpt.ppo.steps import sample_prompts
    from minichatgpt.runtime.device import resolve

    held_out = sample_prompts(prompts, "eval", None, None)
    seed = stage_seed(params.seed, "evaluate")
    reward = reward_model if is_function_ref(reward_model) else args.reward  # code only as params.yaml names it
    summary, samples, scores = evaluate(Path(args.checkpoints) / "0", final_dir, reward, held_out, gen, seed,
                                        params.samples, resolve(runtime.device, runtime.dtype))
    summary["iterations"] = int(last)
    write_json(iteration_rows(stats), args.iterations)
    write_json(reward_histogram(scores["before"], scores["after"]), args.distribution)
    write_json(summary, args.summary)
    write_json(samples, args.samples)
    return {k: summary[k] for k in ("reward_before", "reward_after", "reward_stderr", "kl")}


if __name__ == "__main__":
    run("evaluate", main)
