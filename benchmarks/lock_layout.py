"""Where a long `dvc repro` spends its time: one dvc.yaml (and dvc.lock) for all iterations, or one per block.

A probe for long runs, not a pipeline feature. The tiny preset with N iterations in a scratch repository
(the test suite's builder) runs once as today's single `foreach` pipeline (``single``) and once with the
iteration stages split into ``blocks/bNNN/dvc.yaml`` files of BLOCK iterations each (``blocks``:
``wdir: ../..``, each block with its own dvc.lock). Prints the median seconds from one rollout start to
the next over iterations 2-11 and 50-59 and the time of a no-op `dvc repro`; keeps them in
benchmarks/lock_layout.json.

    N=60 BLOCK=10 .venv/bin/python benchmarks/lock_layout.py single
    N=60 BLOCK=10 .venv/bin/python benchmarks/lock_layout.py blocks
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import TINY_PARAMS, make_pipeline_repo, tool_env  # noqa: E402

ITERATION_STAGES = ("rollout", "score", "advantages", "update")


def split_into_blocks(repo: Path, n: int, block: int) -> None:
    """Move the iteration stages of the root dvc.yaml into one dvc.yaml per ``block`` iterations."""
    root = yaml.safe_load((repo / "dvc.yaml").read_text())
    templates = {name: root["stages"].pop(name)["do"] for name in ITERATION_STAGES}
    for first in range(1, n + 1, block):
        keys = {str(i): {"prev": str(i - 1)} for i in range(first, min(first + block - 1, n) + 1)}
        stages = {name: {"foreach": keys, "do": do | {"wdir": "../.."}} for name, do in templates.items()}
        where = repo / "blocks" / f"b{(first - 1) // block:03d}"
        where.mkdir(parents=True)
        (where / "dvc.yaml").write_text(yaml.safe_dump({"vars": ["../../params.yaml:runtime"], "stages": stages},
                                                       sort_keys=False))
    (repo / "dvc.yaml").write_text(yaml.safe_dump(root, sort_keys=False))


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")  # (a short run has no iterations 50-59)


def main() -> None:
    variant = sys.argv[1]
    n, block = int(os.environ.get("N", "60")), int(os.environ.get("BLOCK", "10"))
    dest = ROOT / "benchmarks" / "_work" / f"lock-{variant}"
    if dest.exists():
        shutil.rmtree(dest)
    params = json.loads(json.dumps(TINY_PARAMS))
    params["iters"] = {str(i): {"prev": str(i - 1)} for i in range(1, n + 1)}
    repo = make_pipeline_repo(dest, params)
    env = tool_env() | {"MINICHATGPT_WORKER": os.environ.get("WORKER", "1")}
    if variant == "blocks":
        split_into_blocks(repo, n, block)
        subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
        subprocess.run(["git", "commit", "-qm", "blocks"], cwd=repo, check=True, env=env)
    start = time.perf_counter()
    proc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    rollouts = [time.perf_counter() - start for line in proc.stdout
                if line.startswith("Running stage '") and line.split("'")[1].split("@")[0].endswith("rollout")]
    if proc.wait():
        sys.exit(f"{variant}: dvc repro failed in {repo}")
    total = time.perf_counter() - start
    per = [b - a for a, b in zip(rollouts, rollouts[1:])]  # per[i]: rollout@(i+1) start to rollout@(i+2) start
    t0 = time.perf_counter()
    subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, check=True)
    result = {"variant": variant, "n": n, "block": block if variant == "blocks" else None, "total_s": total,
              "iter_2_11_s": _median(per[1:11]), "iter_50_59_s": _median(per[49:59]),
              "noop_s": time.perf_counter() - t0,
              "lock_kb": sum(p.stat().st_size for p in repo.rglob("dvc.lock")) / 1024, "per_iter": per}
    result["ratio"] = result["iter_50_59_s"] / result["iter_2_11_s"]
    print(json.dumps({k: v for k, v in result.items() if k != "per_iter"}))
    out = ROOT / "benchmarks" / "lock_layout.json"
    runs = json.loads(out.read_text()) if out.is_file() else []
    out.write_text(json.dumps([r for r in runs if r["variant"] != variant] + [result], indent=1) + "\n")


if __name__ == "__main__":
    main()
