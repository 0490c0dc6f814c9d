"""The walkthrough notebook executes headless against models built by the real stages."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT, TINY_PARAMS, tool_env, write_params


@pytest.fixture(scope="module")
def built_project(tmp_path_factory) -> Path:
    """A project dir whose checkpoints/0 and models/reward come from tiny runs of the stages."""
    root = tmp_path_factory.mktemp("nbproject")
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    write_params(root / "params.yaml", TINY_PARAMS)
    for stage in ("prepare", "pretrain", "train_reward"):
        proc = subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py")], cwd=root, env=tool_env(),
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    return root


def test_walkthrough_notebook_runs_headless(built_project: Path) -> None:
    nb = nbformat.read(ROOT / "notebooks" / "ppo_walkthrough.ipynb", as_version=4)
    workdir = built_project / "notebooks"
    workdir.mkdir(exist_ok=True)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}})
    client.execute()
    outputs = {i: cell.get("outputs", []) for i, cell in enumerate(nb.cells) if cell.cell_type == "code"}
    errors = [o for outs in outputs.values() for o in outs if o.get("output_type") == "error"]
    assert not errors
    last = nb.cells[-1]["outputs"][0]["data"]["text/plain"]
    assert "policy/clipfrac" in last and "objective/kl" in last
