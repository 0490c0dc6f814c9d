"""``make bench-long``: a long PPO run of the default models, ``dvc repro`` vs TRL 0.11.4.

Both start from the same pretrained policy, initial value head, reward model, PPO params and
per-iteration training prompts (as ``make bench-learning``), at ``--batch`` rollouts per iteration
for ``--iterations`` iterations:

- minichatgpt: one ``dvc repro`` of a scratch copy of this repository with ``ppo.iterations`` and
  ``ppo.batch_size`` set (every stage cached, in the warm worker, with the portable kernels);
- TRL 0.11.4's legacy ``PPOTrainer`` in its own virtualenv, one process, the policy saved at the
  evaluation points.

Then TRL once more, timing only, under the kernel pins of the stage environment, which splits the
time ratio into the portable kernels' share and the pipeline's. Then one evaluator (the ``evaluate``
stage's: held-out prompts and sampling seed, reward-model score,
summed KL to the pretrained reference) judges both at ``--eval-at``. The two runs take turns on the
machine (TRL first), so load from other processes is not shared alike: keep the machine quiet.
Writes ``benchmarks/long_run.json`` and ``benchmarks/long_run.png``.

    make bench-long                                      # 200 iterations at batch 64, ~20 min on 2 cores
    .venv/bin/python benchmarks/long_run.py --iterations 4 --eval-at 0,2,4   # a quick check of the script
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
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
    dir_bytes,
    ensure_default_models,
    iteration_inputs,
    log,
    plot_with,
    scratch_repo,
    stop_warm_workers,
    timed_dvc_repro,
    trl_python,
    workload,
)
from learning import held_out_figures  # noqa: E402

RUN_ENV = {"MINICHATGPT_WORKER_IDLE": "60", "MINICHATGPT_BENCH_RUN": str(os.getpid())}


KERNEL_PINS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "NPY_DISABLE_CPU_FEATURES")
"""The stage environment's kernel choices (minichatgpt/runtime/hermetic.py), for TRL's timing-only second run."""


def timed_trl(work: dict, n: int, name: str, env_extra: dict | None = None) -> tuple[float, list[dict]]:
    """TRL in one process for ``n`` iterations of ``work``: wall seconds from its start, and each step's answer."""
    start = time.perf_counter()
    trl = Worker(trl_python(), "trl_iter.py", work, name, env_extra=env_extra)
    steps = [trl.request(cmd="step", index=i) for i in range(n)]
    wall = time.perf_counter() - start
    trl.close()
    return wall, steps


def run_trl_pinned(raw: dict, n: int, batch: int, threads: int) -> dict:
    """TRL again, timing only, under the kernels every stage is pinned to: what the same work costs
    with the portable kernels, so the whole ratio splits into kernels and pipeline."""
    from minichatgpt.runtime.hermetic import PINNED

    pins = {k: PINNED[k] for k in KERNEL_PINS}
    iters = [iteration_inputs(raw, batch, i) for i in range(1, n + 1)]
    work = workload(raw, [{"batch_size": batch, "iterations": iters}], threads)
    log(f"TRL 0.11.4 under the stages' kernel pins: {n} iterations at batch {batch}")
    wall, steps = timed_trl(work, n, "long-trl-pinned", pins)
    return {"s": wall, "per_iter_s": [s["s"] for s in steps], "pins": pins}


def run_trl(raw: dict, n: int, batch: int, threads: int, eval_at: list[int]) -> dict:
    """TRL for ``n`` iterations in one process: wall seconds from its start, seconds per iteration."""
    save = WORK / "long-trl"
    shutil.rmtree(save, ignore_errors=True)
    iters = [iteration_inputs(raw, batch, i) for i in range(1, n + 1)]
    work = workload(raw, [{"batch_size": batch, "iterations": iters, "save_dir": str(save),
                           "save_at": [i for i in eval_at if i > 0]}], threads)
    log(f"TRL 0.11.4: {n} iterations at batch {batch}")
    wall, steps = timed_trl(work, n, "long-trl")
    for i in eval_at:  # TRL saves the LM only: add our tokenizer files so one loader reads both
        if i > 0:
            for f in (ROOT / "checkpoints/0").iterdir():
                if f.name.startswith("tokenizer"):
                    shutil.copy2(f, save / str(i) / f.name)
    dirs = {i: (ROOT / "checkpoints/0" if i == 0 else save / str(i)) for i in eval_at}
    return {"s": wall, "per_iter_s": [s["s"] for s in steps], "kl_coef": [s["kl_coef"] for s in steps],
            "train_reward": [s["reward_mean"] for s in steps], "dirs": dirs}


def per_iteration(timed: dict, n: int) -> tuple[list[float], list[float]]:
    """Seconds of each iteration (one rollout start to the next, the last one to the next stage)
    and, of those, DVC's own: everything outside the four stages' code."""
    marks = timed["marks"] + [(timed["s"], "end")]
    starts = {name.split("@")[1]: k for k, (_, name) in enumerate(marks) if name.startswith("rollout@")}
    inside: dict[str, float] = {}
    for name, s in timed["inside_runs_s"]:
        if "@" in name:
            it = name.split("@")[1]
            inside[it] = inside.get(it, 0.0) + s
    seconds, bookkeeping = [], []
    for i in range(1, n + 1):
        k = starts[str(i)]
        end = marks[starts[str(i + 1)]][0] if i < n else marks[k + 4][0]
        seconds.append(end - marks[k][0])
        bookkeeping.append(seconds[-1] - inside.get(str(i), 0.0))
    return seconds, bookkeeping


def run_dvc(raw: dict, n: int, batch: int, threads: int, eval_at: list[int]) -> dict:
    """One ``dvc repro`` of the whole pipeline for ``n`` iterations in a scratch copy."""

    def edit(p: dict) -> None:
        p.update(json.loads(json.dumps(raw)))
        p["runtime"]["threads"] = threads

    repo = scratch_repo("long-dvc", edit)
    cache_before = dir_bytes(repo / ".dvc/cache")
    log(f"minichatgpt: dvc repro of {n} iterations at batch {batch} in {repo.relative_to(ROOT)}")
    try:
        timed = timed_dvc_repro(repo, None, threads, extra_env=RUN_ENV)
    finally:
        stop_warm_workers("MINICHATGPT_BENCH_RUN", RUN_ENV["MINICHATGPT_BENCH_RUN"])
    seconds, bookkeeping = per_iteration(timed, n)
    summary = json.loads((repo / "metrics/summary.json").read_text())
    return {"s": timed["s"], "per_iter_s": seconds, "bookkeeping_s": bookkeeping,
            "cache_mb_per_iter": (dir_bytes(repo / ".dvc/cache") - cache_before) / n / 1e6,
            "evaluate_stage": summary, "dirs": {i: repo / "checkpoints" / str(i) for i in eval_at}}


def reward_at_kl(curve: list[dict], kl: float) -> float:
    """Reward of a run at a given KL, linear between its evaluated points (sorted by KL); beyond its
    largest KL, its reward there (a run that never spent that much KL gets no credit for it)."""
    pts = sorted((c["kl"], c["reward"]) for c in curve)
    kls = [k for k, _ in pts]
    j = bisect.bisect_left(kls, kl)
    if j == 0:
        return pts[0][1]
    if j == len(pts):
        return pts[-1][1]
    (k0, r0), (k1, r1) = pts[j - 1], pts[j]
    return r0 + (r1 - r0) * (kl - k0) / (k1 - k0) if k1 > k0 else r1


def evaluate(raw: dict, dirs: dict[str, dict[int, Path]], threads: int) -> dict[str, list[dict]]:
    import pyarrow.parquet as pq
    import torch

    from minichatgpt.models.policy import load_causal_lm
    from minichatgpt.models.reward import RewardModel
    from minichatgpt.params import section
    from minichatgpt.ppo.steps import sample_prompts, stage_seed

    log("evaluating both on the held-out prompts at " + ", ".join(str(i) for i in next(iter(dirs.values()))))
    torch.set_num_threads(threads)
    gen = section(raw, "generation")
    seed = stage_seed(section(raw, "evaluate").seed, "evaluate")
    prompts = sample_prompts(pq.read_table(ROOT / "data/prompts.parquet"), "eval", None, None)
    reward = RewardModel(str(ROOT / "models/reward"), batch_size=gen.forward_batch_size)
    reference = load_causal_lm(ROOT / "checkpoints/0")
    return {who: [{"iteration": i} | held_out_figures(d, reference, reward, prompts, gen, seed)
                  for i, d in sorted(points.items())] for who, points in dirs.items()}


def judge(curves: dict, trl: dict, ours: dict) -> dict:
    first, last = curves["ours"][0], curves["ours"][-1]
    theirs = reward_at_kl(curves["trl"], last["kl"])
    diff_se = math.hypot(last["reward_se"], curves["trl"][-1]["reward_se"])
    ratio = ours["s"] / trl["s"]
    return {
        "dvc_over_trl_time": ratio, "time_goal_met": ratio <= 1.3,
        "gain": last["reward"] - first["reward"], "kl": last["kl"],
        "learning_goal_met": last["reward"] - first["reward"] >= 1.0 and last["kl"] <= 12,
        "trl_reward_at_our_kl": theirs,
        "not_worse_than_trl": last["reward"] >= theirs - 2 * diff_se,
        "judged_by": "time: whole dvc repro / TRL process wall; learning: held-out reward gain from iteration 0 "
                     ">= 1.0 at KL <= 12; not worse: our final reward >= TRL's reward at our final KL (linear "
                     "between TRL's evaluated points) - 2 SE of the difference (held-out prompts)",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64, help="rollouts per iteration (ppo.batch_size)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of both (runtime.threads)")
    ap.add_argument("--eval-at", default="0,50,100,200", help="iterations to evaluate both at")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a value of params.yaml for both (as dvc exp run -S), e.g. ppo.init_kl_coef=0.1")
    ap.add_argument("--no-pinned-trl", dest="pinned_trl", action="store_false",
                    help="skip TRL's timing-only second run under the stages' kernel pins (~2.5x its first)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/long_run.json"))
    args = ap.parse_args()
    n, batch = args.iterations, args.batch
    eval_at = sorted({int(i) for i in args.eval_at.split(",") if int(i) <= n})
    t0 = time.perf_counter()
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for item in args.set:
        key, _, value = item.partition("=")
        sect, _, name = key.partition(".")
        if name not in raw.get(sect, {}):
            ap.error(f"--set {item}: params.yaml has no {key}")
        raw[sect][name] = yaml.safe_load(value)
    raw["ppo"]["iterations"], raw["ppo"]["batch_size"] = n, batch
    ensure_default_models()
    trl = run_trl(raw, n, batch, args.threads, eval_at)
    ours = run_dvc(raw, n, batch, args.threads, eval_at)
    pinned = run_trl_pinned(raw, n, batch, args.threads) if args.pinned_trl else None
    curves = evaluate(raw, {"trl": trl.pop("dirs"), "ours": ours.pop("dirs")}, args.threads)
    goals = judge(curves, trl, ours)
    mid = slice(1, None)  # iteration 1 carries the warm worker's start
    results = {
        "iterations": n, "batch_size": batch, "threads": args.threads, "set": args.set, "goals": goals,
        "trl_s": trl["s"], "dvc_s": ours["s"],
        "median_iter_s": {"trl": statistics.median(trl["per_iter_s"][mid] or trl["per_iter_s"]),
                          "dvc": statistics.median(ours["per_iter_s"][mid] or ours["per_iter_s"])},
        "median_dvc_bookkeeping_s": statistics.median(ours["bookkeeping_s"]),
        "cache_mb_per_iter": ours["cache_mb_per_iter"], "held_out": curves,
        "trl_pinned_s": pinned and pinned["s"], "trl_pinned": pinned,
        "dvc_over_trl_pinned_time": pinned and ours["s"] / pinned["s"],
        "evaluate_stage": ours["evaluate_stage"], "trl": trl, "dvc": ours,
        "wall_s": time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.write_text(json.dumps(results, indent=1) + "\n")
    plot_with(PLOT, out, out.with_suffix(".png"))
    log(f"dvc repro {ours['s']:.0f} s vs TRL {trl['s']:.0f} s ({goals['dvc_over_trl_time']:.2f}x); held-out gain "
        f"{goals['gain']:.3f} at KL {goals['kl']:.2f} (TRL at that KL: {goals['trl_reward_at_our_kl']:.3f}); "
        f"{results['wall_s'] / 60:.0f} min")


PLOT = r'''
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
r = json.load(open(sys.argv[1]))
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
ax = axes[0]
n = r["iterations"]
xs = list(range(1, n + 1))
ax.plot(xs, r["trl"]["per_iter_s"], color="tab:orange", lw=0.8, label="TRL 0.11.4 (one process)")
if r.get("trl_pinned"):
    ax.plot(xs, r["trl_pinned"]["per_iter_s"], color="tab:orange", lw=0.8, ls=":",
            label="TRL under the stages' kernel pins")
ax.plot(xs, r["dvc"]["per_iter_s"], color="tab:blue", lw=0.8, label="dvc repro: whole iteration")
ax.plot(xs, r["dvc"]["bookkeeping_s"], color="tab:blue", lw=0.8, ls=":", label="of which outside the stages' code")
ax.set_title("seconds per PPO iteration"); ax.set_xlabel("PPO iteration"); ax.set_ylim(bottom=0); ax.legend(fontsize=8)
panels = ((axes[1], "reward", "held-out reward (±1 SE)"), (axes[2], "kl", "KL to reference (nats/response, ±1 SE)"))
for ax, key, title in panels:
    for who, color, label in (("trl", "tab:orange", "TRL 0.11.4"), ("ours", "tab:blue", "minichatgpt (dvc repro)")):
        c = r["held_out"][who]
        it = [p["iteration"] for p in c]; ys = [p[key] for p in c]; se = [p[key + "_se"] for p in c]
        ax.errorbar(it, ys, yerr=se, color=color, marker="o", capsize=3, label=label)
    ax.set_title(title); ax.set_xlabel("PPO iteration"); ax.grid(alpha=0.3); ax.legend(fontsize=8)
fig.suptitle(f"{n} iterations at batch {r['batch_size']}, same start, params and prompts")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=100)
'''


if __name__ == "__main__":
    main()
