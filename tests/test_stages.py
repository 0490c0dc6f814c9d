"""Stage scripts at their edges: bad input is refused by name and nothing is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from minichatgpt.pipeline.artifacts import read_table, write_table
from tests.conftest import ROOT, TINY_PARAMS, tool_env


def run_stage(name: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "stages" / f"{name}.py"), *args],
        cwd=cwd, env=tool_env(), capture_output=True, text=True,
    )


def scored_table(n: int = 4) -> pa.Table:
    ints, floats = pa.list_(pa.int32()), pa.list_(pa.float32())
    lengths = [3, 1, 4, 2][:n]
    return pa.table({
        "prompt_id": pa.array(range(n), pa.int64()),
        "query_ids": pa.array([[1, 2]] * n, ints),
        "response_ids": pa.array([[5] * k for k in lengths], ints),
        "query": ["a"] * n, "response": ["b"] * n,
        "logprobs": pa.array([[-1.0] * k for k in lengths], floats),
        "values": pa.array([[0.1 * j for j in range(k)] for k in lengths], floats),
        "score": pa.array([1.0, -1.0, 0.5, 2.0][:n], pa.float32()),
        "ref_logprobs": pa.array([[-1.0] * k for k in lengths], floats),
        "kl": pa.array([[0.0] * k for k in lengths], floats),
        "rewards": pa.array([[0.0] * (k - 1) + [s] for k, s in zip(lengths, [1.0, -1.0, 0.5, 2.0])], floats),
        "kl_coef": pa.array([0.2] * n, pa.float32()),
    })


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    write_table(scored_table(), tmp_path / "scored.parquet", "scored")
    return tmp_path


def set_param(workdir: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params[section][key] = value
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.mark.slow
def test_advantages_stage_writes_validated_output(workdir: Path) -> None:
    proc = run_stage("advantages", ["--iter", "1", "--scored", "scored.parquet", "--out", "adv.parquet"], workdir)
    assert proc.returncode == 0, proc.stderr
    table = read_table(workdir / "adv.parquet", "advantages")
    assert [len(a) for a in table["advantages"].to_pylist()] == [3, 1, 4, 2]


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("lam", 1.5, "ppo.lam=1.5"),
    ("gamma", -0.5, "ppo.gamma=-0.5"),
    ("lam", "high", "ppo.lam='high'"),
    ("lamb", 0.9, "did you mean ppo.lam"),
])
def test_bad_params_fail_in_one_line_and_write_nothing(workdir: Path, key, value, needle) -> None:
    set_param(workdir, "ppo", key, value)
    proc = run_stage("advantages", ["--iter", "1", "--scored", "scored.parquet", "--out", "adv.parquet"], workdir)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stage advantages: ") and needle in lines[0]
    assert not (workdir / "adv.parquet").exists()
    assert not list(workdir.glob(".tmp-*"))


def test_mistyped_artifact_is_refused_by_file_and_column(workdir: Path) -> None:
    table = scored_table().set_column(7, "score", pa.array(["x"] * 4))
    import pyarrow.parquet as pq

    pq.write_table(table, workdir / "bad.parquet")
    proc = run_stage("advantages", ["--iter", "1", "--scored", "bad.parquet", "--out", "adv.parquet"], workdir)
    assert proc.returncode == 2
    assert "bad.parquet" in proc.stderr and "'score'" in proc.stderr and "float" in proc.stderr
    assert not (workdir / "adv.parquet").exists()


@pytest.mark.parametrize("stage", ["prepare", "pretrain", "train_reward", "rollout", "score", "advantages",
                                   "update", "evaluate"])
def test_every_stage_has_help(stage: str, tmp_path: Path) -> None:
    proc = run_stage(stage, ["--help"], tmp_path)
    assert proc.returncode == 0 and "--params" in proc.stdout
