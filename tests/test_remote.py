"""A finished run travels through a DVC remote: push, fresh clone, pull, nothing recomputed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import sh

pytestmark = pytest.mark.e2e


def fresh_clone(origin: Path, dest: Path, remote: Path) -> Path:
    sh(["git", "clone", "-q", str(origin), str(dest)], origin.parent)
    # --local: the remote lives in .dvc/config.local, so the committed repo is untouched
    sh(["dvc", "remote", "add", "--local", "-d", "store", str(remote)], dest)
    return dest


def assert_nothing_to_do(clone: Path) -> None:
    run = sh(["dvc", "repro"], clone)
    assert "Running stage" not in run.stdout, run.stdout
    assert "up to date" in sh(["dvc", "status"], clone).stdout
    assert (clone / "checkpoints/2/model.safetensors").is_file()


def test_push_then_pull_run_cache_in_a_fresh_clone_recomputes_nothing(pipeline_repo: Path, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    sh(["dvc", "remote", "add", "--local", "-f", "store", str(remote)], pipeline_repo)
    pushed = sh(["dvc", "push", "-r", "store", "--run-cache"], pipeline_repo)
    assert "pushed" in pushed.stdout
    assert any(remote.rglob("*"))

    clone = fresh_clone(pipeline_repo, tmp_path / "clone", remote)
    assert not (clone / "checkpoints/2").exists()
    sh(["dvc", "pull", "--run-cache"], clone)
    assert_nothing_to_do(clone)

    # `dvc repro --pull` gets there in one command
    other = fresh_clone(pipeline_repo, tmp_path / "other", remote)
    run = sh(["dvc", "repro", "--pull"], other)
    assert "Running stage" not in run.stdout, run.stdout
    assert_nothing_to_do(other)
