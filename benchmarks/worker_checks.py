"""What the warm worker's exactness checks cost per stage, measured beside the stage they guard.

A served stage pays, before it runs: the stage process's settings and key (umask, nice,
rlimits, affinity, cgroup, ...: ``worker.process_facts`` and ``worker.worker_key``), and the
child's check that no loaded source changed (a ``stat`` of every loaded module, mapped library
and distribution record). This runs a real stage (``check_params`` on the tiny preset) through a
warm worker ``--runs`` times, times those checks in the same process tree, and prints their
share of the stage's wall time. Writes ``benchmarks/worker_checks.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(fn, repeat: int) -> float:
    """Median milliseconds of ``fn()``."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="served stage runs to time")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/worker_checks.json"))
    args = ap.parse_args()

    import yaml

    from minichatgpt.params.presets import compose
    from minichatgpt.runtime import worker, worker_server
    from minichatgpt.runtime.hermetic import stage_environ

    facts_ms = timed(lambda: worker.worker_key(facts=worker.process_facts()), 50)
    for name in worker_server.PRELOAD:  # what the worker has loaded when it checks its sources
        importlib.import_module(name)
    watched = worker_server._watched()
    stat_ms = timed(lambda: worker_server._stat(watched), 20)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tiny = yaml.safe_load((ROOT / "presets/tiny.yaml").read_text())
        (work / "params.yaml").write_text(yaml.safe_dump(compose(tiny)))
        env = dict(os.environ) | {"MINICHATGPT_WORKER": "1", "MINICHATGPT_WORKER_IDLE": "60",
                                  "MINICHATGPT_WORKER_REPORT": "1", "MINICHATGPT_BENCH_KEY": tmp}
        cmd = [sys.executable, str(ROOT / "stages/check_params.py"), "--out", "schema.json"]
        sock = Path(subprocess.run([sys.executable, "-c", "from minichatgpt.runtime.worker import socket_path; "
                                    "print(socket_path())"], env=stage_environ(env, str(ROOT)), capture_output=True,
                                   text=True, check=True).stdout.strip())
        subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)  # starts the worker
        deadline = time.monotonic() + 120
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        walls = []
        for _ in range(args.runs):
            start = time.perf_counter()
            run = subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True, text=True)
            walls.append((time.perf_counter() - start) * 1000)
            assert "[worker]" in run.stderr, "not served by the worker"
        subprocess.run(["pkill", "-f", f"worker_server {sock}"], check=False)
    stage_ms = statistics.median(walls)
    checks_ms = facts_ms + stat_ms
    result = {
        "watched_files": len(watched),
        "settings_and_key_ms": round(facts_ms, 2),
        "source_stat_ms": round(stat_ms, 2),
        "checks_ms": round(checks_ms, 2),
        "served_stage_ms": round(stage_ms, 1),
        "checks_share_of_stage": round(checks_ms / stage_ms, 4),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
