"""`python -m minichatgpt.pipeline.prune`: a finished run shrunk to what lengthening it needs."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from minichatgpt.pipeline.prune import plan
from tests.conftest import TINY_PARAMS, make_pipeline_repo, out_hashes, sh, stages_run, write_params

PRUNE = [sys.executable, "-m", "minichatgpt.pipeline.prune"]


def cached_files(repo: Path) -> set[str]:
    return {str(p.relative_to(repo)) for p in (repo / ".dvc/cache").rglob("*") if p.is_file()}


@pytest.mark.slow
def test_plan_keeps_the_last_checkpoint_and_the_metrics_of_every_iteration(tmp_path: Path) -> None:
    from dvc.repo import Repo

    params = json.loads(json.dumps(TINY_PARAMS))
    params["ppo"]["iterations"] = 12  # two stage files
    repo = make_pipeline_repo(tmp_path / "repo", params)
    with Repo(str(repo)) as dvc:
        todo = plan(list(dvc.index.stages), keep_checkpoints={5})
    keep, drop = {str(o) for o in todo.keep}, {str(o) for o in todo.drop}
    assert todo.last == 12
    assert {p for p in keep if p.startswith("checkpoints/")} == {"checkpoints/0", "checkpoints/5", "checkpoints/12"}
    assert {f"metrics/iters/{i}.json" for i in range(1, 13)} <= keep
    assert {"models/reward", "data/prompts.parquet"} <= keep
    assert drop == ({f"checkpoints/{i}" for i in range(1, 12)} - {"checkpoints/5"}) | {
        f"runs/{kind}/{i}.parquet" for kind in ("rollouts", "scored", "advantages") for i in range(1, 13)}


@pytest.mark.e2e
def test_a_pruned_run_lengthens_to_the_same_bytes_as_a_whole_one(pipeline_repo: Path, tmp_path: Path) -> None:
    pruned, whole = tmp_path / "pruned", tmp_path / "whole"
    for dest in (pruned, whole):
        shutil.copytree(pipeline_repo, dest, symlinks=True)
    before = cached_files(pruned)

    dry = sh(PRUNE + ["--dry-run"], pruned)
    assert "would remove" in dry.stdout and cached_files(pruned) == before
    assert (pruned / "checkpoints/1").is_dir()

    done = sh(PRUNE, pruned)
    assert "removed 7 iteration outputs" in done.stdout, done.stdout  # 2 iterations: 6 tables, checkpoints/1
    assert not (pruned / "checkpoints/1").exists() and not (pruned / "runs/rollouts/2.parquet").exists()
    for kept in ("checkpoints/0", "checkpoints/2", "models/reward", "metrics/iters/1.json"):
        assert (pruned / kept).exists(), kept
    after = cached_files(pruned)
    assert after < before
    # every object of what stays is still cached: a forced checkout restores it byte for byte
    shutil.rmtree(pruned / "checkpoints/2")
    sh(["dvc", "checkout", "iterations/0001-0010/dvc.yaml:update@2"], pruned)
    status = sh(["dvc", "status", "iterations/0001-0010/dvc.yaml:update@2"], pruned).stdout
    assert "changed outs" not in status and "deleted:            runs/advantages/2.parquet" in status, status
    # nothing reruns with --allow-missing
    noop = sh(["dvc", "repro", "--allow-missing"], pruned)
    assert stages_run(noop.stdout) == set(), noop.stdout

    # lengthen both to 3 iterations: only iteration 3 and evaluate run, with the same bytes
    for dest in (pruned, whole):
        params = yaml.safe_load((dest / "params.yaml").read_text())
        params["ppo"]["iterations"] = 3
        write_params(dest / "params.yaml", params)
        sh(["dvc", "repro", "--allow-missing"], dest, check=False)  # check_params writes the stage files, stops
    runs = {dest: sh(["dvc", "repro", "--allow-missing"], dest) for dest in (pruned, whole)}
    assert stages_run(runs[pruned].stdout) == {f"{s}@3" for s in ("rollout", "score", "advantages", "update")} | {
        "check_params", "evaluate"}
    assert out_hashes(pruned) == out_hashes(whole)
    summary = [json.loads((d / "metrics/summary.json").read_text()) for d in (pruned, whole)]
    assert summary[0] == summary[1] and summary[0]["iterations"] == 3


@pytest.mark.e2e
def test_prune_refuses_a_run_that_is_not_up_to_date(pipeline_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(pipeline_repo, repo, symlinks=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["ppo"]["lam"] = 0.9
    write_params(repo / "params.yaml", params)
    before = cached_files(repo)
    refused = sh(PRUNE, repo, check=False)
    assert refused.returncode == 1
    assert "not up to date (changed: check_params)" in refused.stderr, refused.stderr  # it writes the inputs files
    assert cached_files(repo) == before and (repo / "checkpoints/1").is_dir()
