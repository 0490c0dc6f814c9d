"""The iteration stages' dvc.yaml files: one per block of 10 iterations, written from one template."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from minichatgpt.pipeline import iterations
from minichatgpt.pipeline.iterations import BLOCK, block_ranges, expected, stage_address, stage_name, stale, write
from tests.conftest import ROOT, TINY_PARAMS, make_pipeline_repo, tool_env, write_params


def pipeline_dir(tmp_path: Path) -> Path:
    (tmp_path / iterations.DIR).mkdir()
    shutil.copy(ROOT / iterations.TEMPLATE, tmp_path / iterations.TEMPLATE)
    return tmp_path


@pytest.mark.parametrize("n", [1, 9, 10, 11, 25, 200])
def test_blocks_hold_each_iteration_once_at_fixed_places(n: int) -> None:
    ranges = block_ranges(n)
    covered = [i for first, last in ranges for i in range(first, last + 1)]
    assert covered == list(range(1, n + 1))
    assert [first for first, _ in ranges] == list(range(1, n + 1, BLOCK))
    assert all(last - first < BLOCK for first, last in ranges)


def test_each_iteration_continues_from_the_one_before() -> None:
    files = expected(ROOT, 25)
    chain = {}
    for text in files.values():
        block = yaml.safe_load(text)
        chain |= block["vars"][1]["iters"]
        assert set(block["stages"]) == {"rollout", "score", "advantages", "update"}
        for stage in block["stages"].values():
            assert stage["foreach"] == "${iters}" and stage["do"]["wdir"] == "../.."
    assert chain == {str(i): {"prev": str(i - 1)} for i in range(1, 26)}


def test_lengthening_a_run_leaves_its_finished_blocks_byte_identical() -> None:
    short, longer = expected(ROOT, 10), expected(ROOT, 25)
    assert short["iterations/0001-0010/dvc.yaml"] == longer["iterations/0001-0010/dvc.yaml"]
    partial, full = expected(ROOT, 15)["iterations/0011-0020/dvc.yaml"], longer["iterations/0011-0020/dvc.yaml"]
    assert yaml.safe_load(partial)["vars"][1]["iters"].keys() < yaml.safe_load(full)["vars"][1]["iters"].keys()
    assert yaml.safe_load(partial)["stages"] == yaml.safe_load(full)["stages"]


def test_write_changes_only_what_the_count_needs(tmp_path: Path) -> None:
    root = pipeline_dir(tmp_path)
    assert write(root, 25) == ["iterations/0001-0010/dvc.yaml", "iterations/0011-0020/dvc.yaml",
                               "iterations/0021-0030/dvc.yaml"]
    assert write(root, 25) == [] and stale(root, 25) == []
    (root / "iterations/0021-0030/dvc.lock").write_text("schema: '2.0'\n")  # as DVC would leave it
    assert write(root, 12) == ["iterations/0011-0020/dvc.yaml", "iterations/0021-0030/dvc.yaml"]
    assert not (root / "iterations/0021-0030").exists()
    assert sorted(p.name for p in (root / "iterations").iterdir()) == ["0001-0010", "0011-0020", "stages.yaml"]
    assert list(yaml.safe_load((root / "iterations/0011-0020/dvc.yaml").read_text())["vars"][1]["iters"]) == ["11",
                                                                                                                "12"]
    assert not list(root.rglob("*.tmp-*"))


def test_the_committed_stage_files_are_those_of_params_yaml() -> None:
    n = yaml.safe_load((ROOT / "params.yaml").read_text())["ppo"]["iterations"]
    assert stale(ROOT, n) == [], "run `python -m minichatgpt.pipeline.iterations`"


def test_the_command_writes_the_files_of_params_yaml(tmp_path: Path) -> None:
    root = pipeline_dir(tmp_path)
    (root / "params.yaml").write_text("ppo:\n  iterations: 11\n")
    run = subprocess.run([sys.executable, "-m", "minichatgpt.pipeline.iterations", "--params",
                          str(root / "params.yaml")], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "ppo.iterations=11" in run.stdout and stale(root, 11) == []
    (root / "params.yaml").write_text("ppo:\n  iterations: 0\n")
    run = subprocess.run([sys.executable, "-m", "minichatgpt.pipeline.iterations", "--params",
                          str(root / "params.yaml")], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1 and "ppo.iterations=0 is not allowed" in run.stderr
    assert stale(root, 11) == []  # a refused count changes nothing


def test_dvc_reads_the_blocks_as_one_chain_and_check_params_rewrites_stale_ones(tmp_path: Path, monkeypatch) -> None:
    """Real DVC: 12 iterations are two dvc.yaml files whose stages chain across the block boundary;
    a changed ppo.iterations makes check_params write the files and stop with exit 2."""
    params = json.loads(json.dumps(TINY_PARAMS))
    params["ppo"]["iterations"] = 12
    repo = make_pipeline_repo(tmp_path / "repo", params)
    from dvc.repo import Repo

    monkeypatch.chdir(repo)  # (stage addresses are relative to the working directory)
    with Repo(str(repo)) as dvc:
        stages = {s.addressing: s for s in dvc.index.stages}
        upstream = {s.addressing: {u.addressing for u in dvc.index.graph.successors(s)} for s in dvc.index.stages}
    assert stages["iterations/0011-0020/dvc.yaml:rollout@11"].cmd.startswith(
        "python stages/rollout.py --iter 11 --inputs data/inputs/rollout.json --policy checkpoints/10 ")
    assert "check_params" in upstream["iterations/0011-0020/dvc.yaml:rollout@11"]  # data/inputs/rollout.json
    assert "iterations/0001-0010/dvc.yaml:update@10" in upstream["iterations/0011-0020/dvc.yaml:rollout@11"]
    assert "iterations/0011-0020/dvc.yaml:update@12" in upstream["evaluate"]
    assert sum(name.startswith("iterations/") for name in stages) == 4 * 12
    # the benchmarks address iteration stages the same way (a plain "update@12" is not found)
    addresses = {stage_address(name, i) for name in ("rollout", "update") for i in (1, 10, 11, 12)}
    assert addresses <= set(stages) and {stage_name(a) for a in addresses} == {"rollout@1", "update@1", "rollout@10",
                                                                               "update@10", "rollout@11", "update@11",
                                                                               "rollout@12", "update@12"}

    params["ppo"]["iterations"] = 3
    write_params(repo / "params.yaml", params)
    run = subprocess.run([sys.executable, "stages/check_params.py", "--out", "data/params_schema.json"], cwd=repo,
                         env=tool_env(), capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "ppo.iterations=3" in run.stderr and "iterations/0011-0020/dvc.yaml" in run.stderr
    assert "run the same command again" in run.stderr
    assert stale(repo, 3) == [] and not (repo / "data/params_schema.json").exists()
    run = subprocess.run([sys.executable, "stages/check_params.py", "--out", "data/params_schema.json"], cwd=repo,
                         env=tool_env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
