"""Is a long `dvc repro` linear in its length? The tiny preset, N iterations, then lengthened to M.

A scratch repository (the test suite's builder) runs N iterations in one `dvc repro`: the seconds from
one rollout start to the next give the median per-iteration time over iterations 2-11 and 50-59 (the
iteration stages live in one dvc.yaml per 10 iterations, so their bookkeeping should not grow). Then
`dvc exp run -S ppo.iterations=M` (which stops once to write the new stage files) and `dvc repro`: the
stages that ran must be exactly the new iterations' and `evaluate`; `dvc exp save` records the result.
Then the median of three no-op `dvc repro` of the finished M-iteration run, and last one more iteration
through `dvc exp run`, whose per-stage cost at M iterations is DVC's own (see the README).
Results: benchmarks/long_tiny.json.

    N=60 M=200 .venv/bin/python benchmarks/long_tiny.py      # ~15 min on 2 cores
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minichatgpt.pipeline.iterations import stage_name  # noqa: E402
from tests.conftest import TINY_PARAMS, make_pipeline_repo, tool_env  # noqa: E402


def timed_repro(repo: Path, env: dict, cmd: list[str]) -> tuple[float, list[tuple[float, str, str | None]]]:
    """Seconds of the command and (offset, stage, iteration) of each stage it ran."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ran, lines = [], []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Running stage '"):
            name, _, iteration = stage_name(line.split("'")[1]).partition("@")
            ran.append((time.perf_counter() - start, name, iteration or None))
    if proc.wait():
        sys.exit(f"{cmd} failed in {repo}:\n{''.join(lines[-20:])}")
    return time.perf_counter() - start, ran


def per_iteration(ran: list) -> list[float]:
    """per[i]: from rollout@(i+1) start to rollout@(i+2) start."""
    starts = [t for t, name, _ in ran if name == "rollout"]
    return [b - a for a, b in zip(starts, starts[1:])]


def lengthen(repo: Path, env: dict, m: int) -> bool:
    """`dvc exp run -S ppo.iterations=m`: True if check_params wrote the stage files and stopped."""
    run = subprocess.run(["dvc", "exp", "run", "-S", f"ppo.iterations={m}"], cwd=repo, env=env,
                         capture_output=True, text=True)
    return run.returncode != 0 and "run the same command again" in run.stdout + run.stderr


def main() -> None:
    n, m = int(os.environ.get("N", "60")), int(os.environ.get("M", "200"))
    dest = ROOT / "benchmarks" / "_work" / "long-tiny"
    if dest.exists():
        shutil.rmtree(dest)
    params = json.loads(json.dumps(TINY_PARAMS))
    params["ppo"]["iterations"] = n
    repo = make_pipeline_repo(dest, params)
    env = tool_env() | {"MINICHATGPT_WORKER": os.environ.get("WORKER", "1")}
    total, ran = timed_repro(repo, env, ["dvc", "repro"])
    per = per_iteration(ran)
    early, late = statistics.median(per[1:11]), statistics.median(per[49:59]) if len(per) >= 59 else float("nan")
    print(f"{n} iterations: {total:.0f} s; per iteration {early:.2f} s (2-11), {late:.2f} s (50-59), "
          f"ratio {late / early:.2f}", flush=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, capture_output=True)
    subprocess.run(["git", "commit", "-qm", f"{n} iterations"], cwd=repo, check=True, env=env)

    stopped = lengthen(repo, env, m)
    longer_s, longer = timed_repro(repo, env, ["dvc", "repro"])
    new = [(name, it) for _, name, it in longer if name not in ("check_params", "evaluate")]
    only_new = sorted({int(it) for _, it in new}) == list(range(n + 1, m + 1)) and len(new) == 4 * (m - n)
    also = sorted({name for _, name, _ in longer if name in ("check_params", "evaluate")})
    subprocess.run(["dvc", "exp", "save", "-n", f"run-{m}"], cwd=repo, env=env, check=True, capture_output=True)
    print(f"dvc exp run -S ppo.iterations={m} stopped once to write the stage files: {stopped}; dvc repro then "
          f"{longer_s:.0f} s, {len(new)} iteration stages (only iterations {n + 1}-{m}: {only_new}) + {also}",
          flush=True)
    noop = [timed_repro(repo, env, ["dvc", "repro"])[0] for _ in range(3)]
    print(f"no-op dvc repro of {m} iterations: {statistics.median(noop):.2f} s (runs {noop})", flush=True)
    lengthen(repo, env, m + 1)
    exp_s, exp_ran = timed_repro(repo, env, ["dvc", "exp", "run"])
    stage_starts = [t for t, name, _ in exp_ran if name not in ("check_params",)]
    per_stage = statistics.median(b - a for a, b in zip(stage_starts, stage_starts[1:]))
    print(f"dvc exp run of iteration {m + 1}: {exp_s:.0f} s, {per_stage:.1f} s per stage", flush=True)
    result = {"n": n, "m": m, "first_run_s": total, "iter_2_11_s": early, "iter_50_59_s": late,
              "ratio": late / early, "per_iter_s": per, "lengthen_stopped_once": stopped, "lengthen_s": longer_s,
              "lengthen_ran_only_new": only_new, "lengthen_also_ran": also,
              "lengthen_per_iter_s": per_iteration(longer), "noop_s": statistics.median(noop), "noop_runs_s": noop,
              "exp_run_one_more_s": exp_s, "exp_run_s_per_stage": per_stage,
              "lock_kb_max": max(p.stat().st_size for p in repo.rglob("dvc.lock")) / 1024}
    (ROOT / "benchmarks" / "long_tiny.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
