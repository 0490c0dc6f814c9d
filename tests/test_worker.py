"""The warm stage worker: same bytes as a cold stage process, same refusals, clean fallback."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import yaml

from minichatgpt.artifacts import write_table
from tests.conftest import ROOT, TINY_PARAMS, tool_env
from tests.test_stages import scored_table


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    # a private worker for this test (the key includes MINICHATGPT_* variables), gone soon after
    return tool_env() | {"MINICHATGPT_TEST_KEY": str(tmp_path), "MINICHATGPT_WORKER_IDLE": "30",
                         "MINICHATGPT_WORKER_REPORT": "1", "MINICHATGPT_WORKER": "1"} | extra


def advantages(tmp_path: Path, out: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "stages/advantages.py"), "--iter", "1", "--scored", "scored.parquet",
         "--out", out], cwd=tmp_path, env=env, capture_output=True, text=True)


def test_a_stage_run_by_the_worker_writes_the_bytes_of_a_cold_run_and_refuses_alike(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    write_table(scored_table(), tmp_path / "scored.parquet", "scored")
    env = env_for(tmp_path)
    cold = advantages(tmp_path, "cold.parquet", env | {"MINICHATGPT_WORKER": "0"})
    assert cold.returncode == 0, cold.stderr
    sock = Path(subprocess.run([sys.executable, "-c", "from minichatgpt.worker import socket_path; "
                                "print(socket_path())"], env=env, capture_output=True, text=True,
                               check=True).stdout.strip())
    first = advantages(tmp_path, "first.parquet", env)  # no worker yet: runs here, starts one
    assert first.returncode == 0, first.stderr
    assert "[worker]" not in first.stderr
    deadline = time.monotonic() + 120
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sock.exists(), "the worker did not come up"

    warm = advantages(tmp_path, "warm.parquet", env)
    assert warm.returncode == 0, warm.stderr
    assert "[worker] advantages.py peak_rss_mb=" in warm.stderr  # served by the worker's child
    assert "[advantages] done in" in warm.stderr  # the stage's own log reached our stderr
    for name in ("first.parquet", "warm.parquet"):
        assert (tmp_path / name).read_bytes() == (tmp_path / "cold.parquet").read_bytes()

    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["ppo"]["lam"] = 1.5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    refused = advantages(tmp_path, "bad.parquet", env)
    assert refused.returncode == 2
    assert refused.stderr.splitlines()[0].startswith("stage advantages: ") and "ppo.lam=1.5" in refused.stderr
    assert not (tmp_path / "bad.parquet").exists()
