"""End to end: a tiny pipeline under real `dvc repro` in a temporary git repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_PARAMS, sh, write_params

pytestmark = pytest.mark.e2e

ALL_ITER_STAGES = ("rollout", "score", "advantages", "update")


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def out_hashes(repo: Path) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {
        f"{stage}:{out['path']}": out.get("md5", "")
        for stage, body in lock["stages"].items()
        for out in body.get("outs", [])
    }


def restore(repo: Path) -> None:
    sh(["git", "checkout", "--", "."], repo)
    sh(["dvc", "checkout", "--force"], repo)


@pytest.fixture
def repo(pipeline_repo: Path) -> Path:
    return pipeline_repo


def test_first_repro_runs_every_stage(repo: Path) -> None:
    first = (repo / ".git" / "first_repro.log").read_text()
    expected = {"prepare", "pretrain", "train_reward", "evaluate"} | {
        f"{s}@{i}" for s in ALL_ITER_STAGES for i in (1, 2)
    }
    assert stages_run(first) == expected


def test_outputs_have_expected_content(repo: Path) -> None:
    import json

    import pyarrow.parquet as pq

    summary = json.loads((repo / "metrics/summary.json").read_text())
    for key in ("reward_before", "reward_after", "reward_stderr", "kl"):
        assert isinstance(summary[key], float)
    assert summary["n_prompts"] == TINY_PARAMS["data"]["eval_prompts"]
    table = pq.read_table(repo / "runs/advantages/2.parquet")
    assert table.num_rows == TINY_PARAMS["ppo"]["batch_size"]
    state = json.loads((repo / "checkpoints/2/state.json").read_text())
    assert state["iteration"] == 2 and state["kl_coef"] > 0
    # iteration 2 continued from iteration 1's optimizer: Adam's step count accumulates
    ppo = TINY_PARAMS["ppo"]
    per_iter = ppo["ppo_epochs"] * ppo["batch_size"] // ppo["mini_batch_size"]
    assert state["step"] == 2 * per_iter


def test_second_repro_runs_nothing(repo: Path) -> None:
    again = sh(["dvc", "repro"], repo)
    assert stages_run(again.stdout) == set()
    status = sh(["dvc", "status"], repo)
    assert "up to date" in status.stdout


def test_lam_change_reruns_from_first_advantages(repo: Path) -> None:
    try:
        run = sh(["dvc", "exp", "run", "-S", "ppo.lam=0.9"], repo)
        expected = {"advantages@1", "update@1", "rollout@2", "score@2", "advantages@2", "update@2", "evaluate"}
        assert stages_run(run.stdout) == expected
        diff = sh(["dvc", "metrics", "diff", "HEAD"], repo)
        assert "metrics/iters/1.json" in diff.stdout and "summary.json" in diff.stdout
        params = sh(["dvc", "params", "diff", "HEAD"], repo)
        assert "ppo.lam" in params.stdout and "0.9" in params.stdout
    finally:
        restore(repo)


def test_adding_an_iteration_runs_only_its_stages(repo: Path) -> None:
    try:
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["iters"]["3"] = {"prev": "2"}
        write_params(repo / "params.yaml", params)
        run = sh(["dvc", "repro"], repo)
        assert stages_run(run.stdout) == {f"{s}@3" for s in ALL_ITER_STAGES} | {"evaluate"}
    finally:
        restore(repo)


def test_forced_rerun_is_bit_identical(repo: Path) -> None:
    before = out_hashes(repo)
    sh(["dvc", "repro", "--force"], repo)
    assert out_hashes(repo) == before


@pytest.mark.parametrize(("key", "value", "readers"), [
    ("kl_penalty", "k3", {"score@1", "score@2"}),
    ("adap_kl_ctrl", False, {"update@1", "update@2"}),
    ("init_kl_coef", 0.1, {"score@1", "score@2", "update@1", "update@2"}),
    ("whiten_rewards", True, {"advantages@1", "advantages@2"}),
    ("use_score_scaling", True, {"score@1", "score@2"}),
])
def test_a_ppo_option_invalidates_only_the_stages_that_read_it(repo: Path, key, value, readers) -> None:
    import json

    try:
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["ppo"][key] = value
        write_params(repo / "params.yaml", params)
        status = json.loads(sh(["dvc", "status", "--json"], repo).stdout)
        assert set(status) == readers
    finally:
        restore(repo)
