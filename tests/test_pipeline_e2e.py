"""End to end: a tiny pipeline under real `dvc repro` in a temporary git repository."""

from __future__ import annotations

import csv
import io
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from minichatgpt.pipeline.iterations import stage_name
from tests.conftest import (
    ROOT,
    TINY_PARAMS,
    metrics_of,
    out_hashes,
    sh,
    stages_run,
    tool_env,
    write_params,
)

pytestmark = pytest.mark.e2e

ALL_ITER_STAGES = ("rollout", "score", "advantages", "update")


def restore(repo: Path) -> None:
    sh(["git", "rm", "-q", "--cached", "params.yaml"], repo)  # git's index may hold a stale stat (README)
    sh(["git", "checkout", "HEAD", "--", "."], repo)
    sh(["git", "clean", "-fdq"], repo)  # e.g. metrics/iters/3.json of an added iteration (not git-ignored)
    sh(["dvc", "checkout", "--force"], repo)


@pytest.fixture
def repo(pipeline_repo: Path) -> Path:
    return pipeline_repo


def test_first_repro_runs_every_stage(repo: Path) -> None:
    first = (repo / ".git" / "first_repro.log").read_text()
    expected = {"check_params", "prepare", "pretrain", "train_reward", "evaluate"} | {
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


def test_lam_change_reruns_from_first_advantages(repo: Path, tmp_path: Path) -> None:
    try:
        run = sh(["dvc", "exp", "run", "-n", "lam09", "-S", "ppo.lam=0.9"], repo)
        # check_params reads every param and reruns (its output is unchanged, so it invalidates nothing)
        expected = {"check_params", "advantages@1", "update@1", "rollout@2", "score@2", "advantages@2", "update@2",
                    "evaluate"}
        assert stages_run(run.stdout) == expected
        diff = sh(["dvc", "metrics", "diff", "HEAD", "lam09"], repo)
        assert "metrics/summary.json" in diff.stdout and "kl " in diff.stdout
        params = sh(["dvc", "params", "diff", "HEAD", "lam09"], repo)
        assert "ppo.lam" in params.stdout and "0.9" in params.stdout
        # the experiments table has the held-out reward and KL as columns, one row per experiment
        rows = list(csv.DictReader(io.StringIO(sh(["dvc", "exp", "show", "--csv"], repo).stdout)))
        by_name = {row["Experiment"] or row["rev"]: row for row in rows}
        assert float(by_name["lam09"]["reward_after"]) == json.loads(
            (repo / "metrics/summary.json").read_text())["reward_after"]
        assert by_name["lam09"]["kl"] != by_name["main"]["kl"]  # lam changed the trained policy
        # `make compare`: the headline metrics and the changed param, in 160 columns
        recipe = subprocess.run(["make", "-n", "-s", "compare"], cwd=ROOT, capture_output=True, text=True, check=True)
        compare = shlex.split(recipe.stdout.strip().splitlines()[-1])
        table = subprocess.run(["dvc", *compare[1:], "--no-pager"], cwd=repo, env=tool_env() | {"COLUMNS": "160"},
                               capture_output=True, text=True, check=True).stdout
        lines = table.splitlines()
        assert max(map(len, lines)) <= 160
        header = lines[1].split()
        assert header[:5] == ["Experiment", "kl", "reward_after", "reward_gain", "reward_stderr"], table
        assert "ppo.lam" in header and all("." in column for column in header[5:]), table  # changed params only
        assert any("[lam09]" in line and "0.9" in line.split() for line in lines), table
        # plots diff draws both experiments in every chart, offline
        sh(["dvc", "plots", "diff", "HEAD", "lam09", "-o", str(tmp_path / "diff")], repo)
        html = (tmp_path / "diff" / "index.html").read_text()
        assert html.count("vegaEmbed('#") == 8
        assert html.count('"rev": "lam09"') >= 8 and html.count('"rev": "HEAD"') >= 8
        assert "<script src=" not in html
    finally:
        restore(repo)


def test_plots_show_renders_offline_html(repo: Path, tmp_path: Path) -> None:
    sh(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], repo)
    html = (tmp_path / "plots" / "index.html").read_text()
    specs = [json.loads(s) for s in re.findall(r"var spec = (\{.*?\});\s*vegaEmbed", html, re.S)]
    titles = [spec["title"]["text"] if isinstance(spec["title"], dict) else spec["title"] for spec in specs]
    assert len(specs) == 8 and "KL to the reference per PPO iteration" in titles
    assert not re.search(r"<script[^>]*\bsrc=", html)  # no CDN (or any external) script
    assert "window.vegaEmbed" in html  # the inlined bundle defines what each chart's script calls
    by_title = dict(zip(titles, specs))
    reward = [row for row in by_title["Batch reward per PPO iteration"]["data"]["values"] if "reward_mean" in row]
    assert [int(row["iteration"]) for row in reward] == [1, 2]
    for row in reward:
        logged = json.loads((repo / f"metrics/iters/{row['iteration']}.json").read_text())["env/reward_mean"]
        assert float(row["reward_mean"]) == pytest.approx(logged)
    kl = json.dumps({k: v for k, v in by_title["KL to the reference per PPO iteration"].items() if k != "data"})
    assert '"field": "kl"' in kl and "reward_mean" not in kl  # reward and KL on their own axes
    samples = by_title["Held-out samples before and after PPO"]["data"]["values"]
    assert len(samples) == TINY_PARAMS["evaluate"]["samples"] and {"query", "response_after"} <= set(samples[0])


def test_lengthening_the_run_stops_once_then_runs_only_the_new_iteration(repo: Path) -> None:
    """`dvc exp run -S ppo.iterations=3`: check_params writes the stage file and stops (DVC read the stage
    files before it ran); the same command again runs iteration 3's four stages and evaluate, nothing else."""
    try:
        first = sh(["dvc", "exp", "run", "-S", "ppo.iterations=3"], repo, check=False)
        assert first.returncode != 0 and stages_run(first.stdout) == {"check_params"}
        assert "wrote iterations/0001-0010/dvc.yaml" in first.stdout + first.stderr
        run = sh(["dvc", "exp", "run"], repo)
        assert stages_run(run.stdout) == {f"{s}@3" for s in ALL_ITER_STAGES} | {"check_params", "evaluate"}
        assert json.loads((repo / "metrics/summary.json").read_text())["iterations"] == 3
        # back to 2 and to 3 again: the run-cache now holds check_params for 3 iterations, yet the
        # check runs (a restored output would leave the 2-iteration stage file, and evaluate would fail)
        restore(repo)
        again = sh(["dvc", "exp", "run", "-S", "ppo.iterations=3"], repo, check=False)
        assert again.returncode != 0 and "wrote iterations/0001-0010/dvc.yaml" in again.stdout + again.stderr
    finally:
        restore(repo)


def test_forced_rerun_is_bit_identical(repo: Path) -> None:
    before, metrics_before = out_hashes(repo), metrics_of(repo)
    assert len(before) == 15 + 5 * TINY_PARAMS["ppo"]["iterations"]  # every output, metrics and plots included
    sh(["dvc", "repro", "--force"], repo)
    assert out_hashes(repo) == before
    assert metrics_of(repo) == metrics_before


@pytest.mark.parametrize(("key", "value", "readers"), [
    ("kl_penalty", "k3", {"score@1", "score@2"}),
    ("adap_kl_ctrl", False, {"update@1", "update@2"}),
    ("init_kl_coef", 0.2, {"score@1", "score@2", "update@1", "update@2"}),
    ("whiten_rewards", False, {"advantages@1", "advantages@2"}),
    ("use_score_scaling", True, {"score@1", "score@2", "update@1", "update@2"}),  # update carries the moments
])
def test_a_ppo_option_invalidates_only_the_stages_that_read_it(repo: Path, key, value, readers) -> None:
    import json

    try:
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["ppo"][key] = value
        write_params(repo / "params.yaml", params)
        status = json.loads(sh(["dvc", "status", "--json"], repo).stdout)
        assert {stage_name(address) for address in status} == {"check_params"}  # reads every param
        sh(["dvc", "repro", "check_params"], repo)  # writes the iteration stages' data/inputs/*.json
        status = json.loads(sh(["dvc", "status", "--json"], repo).stdout)
        assert {stage_name(address) for address in status} == readers  # and invalidates nothing itself
    finally:
        restore(repo)
