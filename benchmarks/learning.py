"""``make bench-learning``: does minichatgpt learn as well as TRL 0.11.4 from the same start?

For each seed, both run the default number of PPO iterations (``iters`` in params.yaml) from
the same pretrained policy, initial value head, reward model, PPO params and per-iteration
training prompts:

- TRL 0.11.4 legacy ``PPOTrainer`` in its virtualenv (policy saved after every iteration);
- minichatgpt's pipeline: ``dvc repro`` in a scratch copy of this repository (checkpoints/<i>).

Every checkpoint of both is then judged by ONE evaluator (minichatgpt's, as the ``evaluate``
stage): the same 512 held-out prompts and sampling seed, reward-model score and summed
per-token KL to the pretrained reference. Writes ``benchmarks/learning.json`` and
``benchmarks/learning.png``.

Noise: each figure carries its standard error over the held-out prompts, and the run is
repeated for ``--seeds`` PPO seeds; "not worse" means our final reward is at least TRL's
minus two standard errors of the difference (prompt SE and seed spread), at a KL no larger
than TRL's plus two standard errors.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ROOT,
    WORK,
    Worker,
    ensure_default_models,
    iteration_inputs,
    log,
    plot_with,
    scratch_repo,
    timed_dvc_repro,
    trl_python,
    workload,
)

from minichatgpt.pipeline.iterations import stage_address  # noqa: E402


def held_out_figures(ckpt: Path, reference, reward, prompts, gen, seed: int) -> dict:
    """Mean reward-model score and summed KL to the reference on the held-out prompts."""
    import numpy as np

    from minichatgpt.models.policy import load_policy
    from minichatgpt.ppo.steps import reference_logprobs, rollout

    policy, tokenizer, _ = load_policy(ckpt, seed)
    table = rollout(policy, tokenizer, prompts, gen, seed, progress=False)
    texts = [q + r for q, r in zip(table["query"].to_pylist(), table["response"].to_pylist())]
    scores = reward.score(texts).astype(np.float64)
    ref = reference_logprobs(reference, table["query_ids"].to_pylist(), table["response_ids"].to_pylist(),
                             tokenizer.pad_token_id, gen.forward_batch_size)
    kl = np.asarray([sum(a) - sum(b) for a, b in zip(table["logprobs"].to_pylist(), ref)])
    n = len(scores)
    return {"reward": float(scores.mean()), "reward_se": float(scores.std(ddof=1) / math.sqrt(n)),
            "kl": float(kl.mean()), "kl_se": float(kl.std(ddof=1) / math.sqrt(n))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3", help="PPO seeds (ppo.seed) to repeat both runs with")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()

    import pyarrow.parquet as pq
    import torch
    import yaml

    from minichatgpt.models.policy import load_causal_lm
    from minichatgpt.models.reward import RewardModel
    from minichatgpt.params import iterations, section
    from minichatgpt.ppo.steps import sample_prompts, stage_seed

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    n_iters = len(iterations(raw))
    batch = section(raw, "ppo").batch_size
    ensure_default_models()
    trl_py = trl_python()
    runs: dict = {"trl": {}, "ours": {}}
    for seed in seeds:
        raw_s = json.loads(json.dumps(raw))
        raw_s["ppo"]["seed"] = seed
        # TRL: the prompts rollout@i of our pipeline draws for this seed
        iters = [iteration_inputs(raw_s, batch, i) for i in range(1, n_iters + 1)]
        save = WORK / f"learning-trl-{seed}"
        shutil.rmtree(save, ignore_errors=True)
        work = workload(raw_s, [{"batch_size": batch, "iterations": iters, "save_dir": str(save)}], args.threads)
        log(f"seed {seed}: TRL 0.11.4, {n_iters} iterations at batch {batch}")
        trl = Worker(trl_py, "trl_iter.py", work, f"learning-trl-{seed}")
        runs["trl"][seed] = {"train": [trl.request(cmd="step", index=i) for i in range(n_iters)]}
        trl.close()
        for i in range(1, n_iters + 1):  # TRL saves the LM only: add our tokenizer files to load it
            for f in (ROOT / "checkpoints/0").iterdir():
                if f.name.startswith("tokenizer"):
                    shutil.copy2(f, save / str(i) / f.name)

        log(f"seed {seed}: minichatgpt pipeline, dvc repro of {n_iters} iterations")

        def edit(p: dict, seed: int = seed) -> None:
            p["ppo"]["seed"] = seed
            p["runtime"]["threads"] = args.threads

        repo = scratch_repo(f"learning-dvc-{seed}", edit)
        runs["ours"][seed] = {"dvc": timed_dvc_repro(repo, stage_address("update", n_iters), args.threads)}
        runs["trl"][seed]["dirs"] = [str(save / str(i)) for i in range(1, n_iters + 1)]
        runs["ours"][seed]["dirs"] = [str(repo / "checkpoints" / str(i)) for i in range(1, n_iters + 1)]

    log("evaluating every checkpoint of both on the held-out prompts")
    torch.set_num_threads(args.threads)
    gen = section(raw, "generation")
    eval_seed = stage_seed(section(raw, "evaluate").seed, "evaluate")
    prompts = sample_prompts(pq.read_table(ROOT / "data/prompts.parquet"), "eval", None, None)
    reward = RewardModel(str(ROOT / "models/reward"), batch_size=gen.forward_batch_size)
    reference = load_causal_lm(ROOT / "checkpoints/0")
    start = held_out_figures(ROOT / "checkpoints/0", reference, reward, prompts, gen, eval_seed)
    curves: dict = {}
    for who in ("trl", "ours"):
        for seed in seeds:
            curves.setdefault(who, {})[seed] = [start] + [
                held_out_figures(Path(d), reference, reward, prompts, gen, eval_seed) for d in runs[who][seed]["dirs"]]

    def final(who: str, key: str) -> tuple[float, float]:
        vals = [curves[who][s][-1][key] for s in seeds]
        ses = [curves[who][s][-1][key + "_se"] for s in seeds]
        mean = statistics.mean(vals)
        prompt_se = math.sqrt(sum(x * x for x in ses)) / len(ses)
        seed_se = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else 0.0
        return mean, max(prompt_se, seed_se)

    (tr, tr_se), (our, our_se) = final("trl", "reward"), final("ours", "reward")
    (tk, tk_se), (ok, ok_se) = final("trl", "kl"), final("ours", "kl")
    diff_se = math.hypot(tr_se, our_se)
    kl_se = math.hypot(tk_se, ok_se)
    results = {
        "iterations": n_iters, "batch_size": batch, "seeds": seeds,
        "trl_reward_after": tr, "trl_reward_se": tr_se, "our_reward_after": our, "our_reward_se": our_se,
        "trl_kl": tk, "trl_kl_se": tk_se, "our_kl": ok, "our_kl_se": ok_se,
        "reward_before": start["reward"],
        "ours_not_worse": bool(our >= tr - 2 * diff_se and ok <= tk + 2 * kl_se),
        "judged_by": "our final reward >= TRL's - 2*SE(diff) and our KL <= TRL's + 2*SE(diff); SE = the larger of "
                     "the held-out-prompt SE and the between-seed SE of the mean over seeds",
        "curves": {w: {str(s): c for s, c in v.items()} for w, v in curves.items()},
        "train": {w: {str(s): r.get("train") or r.get("dvc") for s, r in v.items()} for w, v in runs.items()},
        "wall_s": time.perf_counter() - t0,
    }
    out = ROOT / "benchmarks/learning.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot_with(PLOT, out, ROOT / "benchmarks/learning.png")
    log(f"TRL reward {tr:.3f}±{tr_se:.3f} KL {tk:.2f}±{tk_se:.2f} | ours reward {our:.3f}±{our_se:.3f} "
        f"KL {ok:.2f}±{ok_se:.2f} | ours not worse: {results['ours_not_worse']} ({results['wall_s']:.0f}s)")


PLOT = r'''
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
r = json.load(open(sys.argv[1]))
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for who, color in (("trl", "tab:orange"), ("ours", "tab:blue")):
    for seed, curve in r["curves"][who].items():
        xs = list(range(len(curve)))
        for ax, key in zip(axes, ("reward", "kl")):
            ys = [c[key] for c in curve]
            se = [c[key + "_se"] for c in curve]
            label = ("TRL 0.11.4" if who == "trl" else "minichatgpt (dvc repro)") + f" seed {seed}"
            ax.plot(xs, ys, color=color, alpha=0.9, label=label, linestyle="-" if seed == "0" else "--")
            ax.fill_between(xs, [y - s for y, s in zip(ys, se)], [y + s for y, s in zip(ys, se)],
                            color=color, alpha=0.12)
for ax, title in zip(axes, ("held-out reward (mean score, ±1 SE)", "KL to reference (nats/response, ±1 SE)")):
    ax.set_title(title); ax.set_xlabel("PPO iteration"); ax.grid(alpha=0.3)
axes[0].legend(fontsize=8)
fig.suptitle(f"same start, params and prompts; batch {r['batch_size']}, {len(r['seeds'])} seeds")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
'''


if __name__ == "__main__":
    main()
