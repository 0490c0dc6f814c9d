"""``make gpu-check``: the pipeline on one GPU against TRL 0.11.4 on the same GPU and settings.

A GPT-2-124M-sized policy (``GPT2Config()``'s 12 layers x 768, 12 heads, 1024 positions) with the
embedded tokenizer and reward model, pretrained briefly here, then ``--iterations`` PPO iterations at batch
128 through ``dvc repro`` with ``runtime.device: cuda``, in a scratch copy of this repository
(``benchmarks/_work/gpu-check``). TRL's legacy ``PPOTrainer`` (``trl_iter.py``, its own venv) then
runs the same iterations from the same checkpoint, value head, prompts and response lengths.

Prints seconds per iteration and per stage, peak GPU memory, and the ratio to TRL; writes
``benchmarks/gpu_check.json``. Goal: ``dvc repro`` per iteration <= 1.0x TRL's.

    make gpu-check                                   # needs a CUDA GPU and network for the installs
    .venv/bin/python benchmarks/gpu_check.py --dtype bfloat16 --iterations 5 --pretrain-steps 300
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ROOT,
    WORK,
    Worker,
    copy_checkout,
    iteration_inputs,
    log,
    sh,
    timed_dvc_repro,
    trl_python,
    workload,
    write_run_params,
)

from minichatgpt.pipeline.iterations import stage_address  # noqa: E402

STAGES = ("rollout", "score", "advantages", "update")
TRL_PARTS = ("generate_s", "score_s", "step_s")


def check_params(raw: dict, args: argparse.Namespace) -> None:
    """params.yaml of the check: GPT2Config() sizes, batch 128, the GPU, ``iterations`` iterations
    (``--smoke``: the tiny preset on the CPU, to check this script where there is no GPU)."""
    if args.smoke:
        from minichatgpt.params.presets import compose

        raw |= compose(yaml.safe_load((ROOT / "presets/tiny.yaml").read_text()))
    else:
        raw["pretrain"] |= {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "block_size": 128,
                            "max_steps": args.pretrain_steps, "learning_rate": 6e-4}
        raw["ppo"] |= {"learning_rate": 1.41e-5}  # TRL's default, for a 124M policy
    raw["runtime"] |= {"device": args.device, "dtype": args.dtype}
    raw["ppo"] |= {"batch_size": args.batch_size}
    raw["ppo"] |= {"iterations": args.iterations}


def scratch(args: argparse.Namespace) -> Path:
    """A copy of this repository's tracked files with the check's params, its own git and DVC cache."""
    dest = WORK / "gpu-check"
    copy_checkout(dest, skip=("benchmarks/", "metrics/"))
    raw = yaml.safe_load((dest / "params.yaml").read_text())
    check_params(raw, args)
    write_run_params(dest, raw)
    sh(["git", "init", "-q"], cwd=dest)
    return dest


def per_iteration(marks: list[tuple[float, str]], total_s: float) -> list[float]:
    """Seconds from each rollout@i start to the next one (the last: to evaluate's start, or the end)."""
    starts = [t for t, name in marks if name.startswith("rollout@")]
    ends = starts[1:] + [next((t for t, name in marks if name == "evaluate"), total_s)]
    return [b - a for a, b in zip(starts, ends)]


def stage_means(runs: list[tuple[str, float]]) -> dict[str, float]:
    """Mean seconds of each iteration stage over the iterations (``timed_dvc_repro``'s ``runs_s``)."""
    times: dict[str, list[float]] = {}
    for name, seconds in runs:
        times.setdefault(name.split("@")[0], []).append(seconds)
    return {k: statistics.mean(v) for k, v in times.items() if k in STAGES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--pretrain-steps", type=int, default=300, help="pretrain.max_steps of the 124M policy")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="the tiny preset on the CPU (2 iterations at batch 8): checks this script without a GPU")
    ap.add_argument("--out", default=None, help="default: benchmarks/gpu_check.json (--smoke: under _work)")
    args = ap.parse_args()
    args.device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        args.iterations, args.batch_size = min(args.iterations, 2), 8

    import torch

    if not args.smoke and not torch.cuda.is_available():
        sys.exit(f"gpu-check: torch {torch.__version__} sees no CUDA GPU here (built for CUDA {torch.version.cuda}); "
                 "--smoke checks the script on the CPU")
    started = time.perf_counter()
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (--smoke)"
    repo = scratch(args)
    log(f"{gpu}: dvc repro pretrain train_reward in {repo.relative_to(ROOT)}")
    models = timed_dvc_repro(repo, "train_reward", 1)
    models_pretrain = timed_dvc_repro(repo, "pretrain", 1)
    log(f"dvc repro: {args.iterations} PPO iterations at batch {args.batch_size}, {args.dtype}")
    ours = timed_dvc_repro(repo, stage_address("update", args.iterations), 1)
    ours_iters = per_iteration(ours["marks"], ours["s"])
    result = {
        "gpu": gpu, "dtype": args.dtype, "batch_size": args.batch_size, "iterations": args.iterations,
        "policy": "tiny preset (--smoke)" if args.smoke else "GPT-2 12 x 768, 12 heads, 1024 positions",
        "pretrain_s": models_pretrain["s"], "train_reward_s": models["s"],
        "dvc_s_per_iter": ours_iters, "dvc_stage_s": stage_means(ours["runs_s"]),
        "dvc_stage_gpu_peak_mb": ours["stage_gpu_peak_mb"],
    }
    if not args.skip_trl:
        raw = yaml.safe_load((repo / "params.yaml").read_text())
        iters = [iteration_inputs(raw, args.batch_size, i, root=repo) for i in range(1, args.iterations + 1)]
        work = workload(raw, [{"batch_size": args.batch_size, "iterations": iters}], 1, root=repo,
                        device=args.device)
        trl = Worker(trl_python(), "trl_iter.py", work, "gpu-trl")
        steps = [trl.request(cmd="step", index=i) for i in range(args.iterations)]
        trl.close()
        result |= {"trl_s_per_iter": [s["s"] for s in steps],
                   "trl_stage_s": {k: statistics.mean(s[k] for s in steps) for k in TRL_PARTS},
                   "trl_gpu_peak_mb": max(s.get("gpu_peak_mb", 0.0) for s in steps)}
        # the first iteration pays CUDA start-up on both sides: compare the medians of the others
        ours_med, trl_med = (statistics.median(x[1:] or x) for x in (ours_iters, result["trl_s_per_iter"]))
        result["ratio_dvc_to_trl"] = ours_med / trl_med
    result["wall_s"] = time.perf_counter() - started
    out = args.out or (WORK / "gpu_check_smoke.json" if args.smoke else ROOT / "benchmarks/gpu_check.json")
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if "ratio_dvc_to_trl" in result:
        print(f"dvc repro {statistics.median(ours_iters[1:] or ours_iters):.2f} s/iteration, "
              f"TRL {statistics.median(result['trl_s_per_iter'][1:]):.2f} s: ratio {result['ratio_dvc_to_trl']:.2f} "
              "(goal <= 1.0)")


if __name__ == "__main__":
    main()
