"""What a stage runs and loads is what DVC recorded: an experiment runs its own copy's code,
and a checkpoint whose bytes changed after it was written is refused, naming the file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import metrics_of, out_hashes, sh, tool_env

pytestmark = pytest.mark.e2e


@pytest.fixture()
def repo(pipeline_repo: Path, tmp_path: Path) -> Path:
    """A copy of the reproduced tiny pipeline (with its DVC cache) that a test may break."""
    copy = tmp_path / "repo"
    shutil.copytree(pipeline_repo, copy, symlinks=True)
    return copy


def rollout_from(repo: Path, checkpoint: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "stages/rollout.py", "--iter", "2", "--policy", checkpoint,
                           "--out", "rollout-check.parquet"], cwd=repo, env=tool_env(), capture_output=True,
                          text=True, timeout=300)


def test_a_truncated_checkpoint_file_is_refused_with_one_line_naming_it(repo: Path) -> None:
    optimizer = repo / "checkpoints/1/optimizer.safetensors"
    data = optimizer.read_bytes()
    optimizer.chmod(0o644)
    optimizer.write_bytes(data[: len(data) // 2])
    run = rollout_from(repo, "checkpoints/1")
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [run.stderr.strip()]  # one line, no traceback
    assert run.stderr.startswith("stage rollout: checkpoints/1/optimizer.safetensors: contents differ from the "
                                 "sha256 recorded in checkpoints/1/SHA256SUMS")
    assert not (repo / "rollout-check.parquet").exists()


BLOCK = "iterations/0001-0010/dvc.yaml"
"""the dvc.yaml of iterations 1-10 (a stage target names its file)"""


def cache_object(repo: Path, out: str, name: str) -> Path:
    """The DVC cache file holding ``name`` inside directory output ``out`` (per dvc.lock)."""
    md5 = next(h for key, h in out_hashes(repo).items() if key.endswith(f":{out}"))
    digest = md5.removesuffix(".dir")
    listing = json.loads((repo / ".dvc/cache/files/md5" / digest[:2] / (digest[2:] + ".dir")).read_text())
    file_md5 = next(e["md5"] for e in listing if e["relpath"] == name)
    return repo / ".dvc/cache/files/md5" / file_md5[:2] / file_md5[2:]


def test_a_corrupted_cache_object_restored_by_dvc_checkout_is_refused(repo: Path) -> None:
    obj = cache_object(repo, "checkpoints/1", "model.safetensors")
    data = bytearray(obj.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the weights: the file still parses
    obj.chmod(0o644)
    obj.write_bytes(bytes(data))
    shutil.rmtree(repo / "checkpoints/1")
    sh(["dvc", "checkout", f"{BLOCK}:update@1"], repo)  # DVC restores the corrupted object without noticing
    assert (repo / "checkpoints/1/model.safetensors").read_bytes() == bytes(data)
    run = rollout_from(repo, "checkpoints/1")
    assert run.returncode == 2 and "checkpoints/1/model.safetensors: contents differ" in run.stderr, run.stderr
    repro = sh(["dvc", "repro", "--force", "--single-item", f"{BLOCK}:rollout@2"], repo, check=False)
    assert repro.returncode != 0
    assert "stage rollout: checkpoints/1/model.safetensors: contents differ" in repro.stdout + repro.stderr


def break_workspace_package(repo: Path) -> None:
    """Make the workspace's package fail at import: a stage that imports it cannot succeed."""
    evaluation = repo / "minichatgpt/pipeline/evaluation.py"
    evaluation.write_text(evaluation.read_text() + "\nraise RuntimeError('the workspace package ran')\n")


def exp_metrics(repo: Path, name: str) -> dict:
    shown = json.loads(sh(["dvc", "exp", "show", "--json"], repo).stdout)
    for rev in shown:
        for exp in rev.get("experiments") or []:
            if exp.get("name") == name:
                data = exp["revs"][0]["data"]
                return data["metrics"]["metrics/summary.json"]["data"]
    raise AssertionError(f"experiment {name} not found")


def editable(repo: Path) -> dict[str, str]:
    """Python finds the workspace's package wherever it runs, as after `pip install -e .` there."""
    return {"PYTHONPATH": str(repo)}


def test_a_queued_experiment_runs_its_own_copy_of_the_code(repo: Path) -> None:
    baseline = metrics_of(repo)["metrics/summary.json"]
    sh(["dvc", "exp", "run", "--queue", "-n", "queued", "-S", "evaluate.seed=101"], repo, env=editable(repo))
    break_workspace_package(repo)  # edited after queueing: the queued experiment must not see it
    run = sh(["dvc", "exp", "run", "--run-all"], repo, check=False, env=editable(repo))
    assert run.returncode == 0, run.stdout + run.stderr
    summary = exp_metrics(repo, "queued")
    assert summary["n_prompts"] == baseline["n_prompts"]
    assert summary["reward_after"] != baseline["reward_after"]  # evaluate ran, on other prompts


def test_a_temp_experiment_runs_its_own_copy_of_the_code(repo: Path) -> None:
    baseline = metrics_of(repo)["metrics/summary.json"]
    run = subprocess.Popen(["dvc", "exp", "run", "--temp", "-n", "temp", "-S", "evaluate.seed=102"], cwd=repo,
                           env=tool_env() | editable(repo), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not list(repo.glob(".dvc/tmp/exps/**/tmp*/minichatgpt/pipeline/evaluation.py")):
        assert run.poll() is None and time.monotonic() < deadline, "no temporary copy appeared"
        time.sleep(0.05)
    break_workspace_package(repo)  # DVC has copied the workspace; its stage has not started yet
    out = run.communicate(timeout=600)[0]
    assert run.returncode == 0, out
    assert "Running stage 'evaluate'" in out
    assert exp_metrics(repo, "temp")["reward_after"] != baseline["reward_after"]
