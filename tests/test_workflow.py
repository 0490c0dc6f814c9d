"""The CI workflow's `run:` steps work verbatim in a clean environment (no venv activated)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, TINY_PARAMS, make_pipeline_repo, sh

pytestmark = pytest.mark.e2e

WORKFLOW = yaml.safe_load((ROOT / ".github/workflows/repro.yml").read_text())
SETUP_STEPS = ("make install", "make test")
"""Run by the suite's own caller (`make test` is this run): the venv they build is linked in."""


def test_the_workflows_run_steps_work_verbatim_in_a_clean_environment(tmp_path: Path) -> None:
    origin = make_pipeline_repo(tmp_path / "origin", TINY_PARAMS)
    shutil.copytree(ROOT / "presets", origin / "presets")
    sh(["git", "add", "-A"], origin)
    sh(["git", "commit", "-qm", "presets"], origin)
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    (clone / ".venv").symlink_to(ROOT / ".venv")
    home = tmp_path / "home"
    home.mkdir()
    job = WORKFLOW["jobs"]["repro"]
    env = {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
           "MINICHATGPT_WORKER_IDLE": "5", **{k: str(v) for k, v in job.get("env", {}).items()}}
    ran = []
    for step in job["steps"]:
        script = step.get("run", "")
        if not script or script.strip() in SETUP_STEPS:
            continue
        proc = subprocess.run(["bash", "-eo", "pipefail", "-c", script], cwd=clone, env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, f"step {step['name']!r}:\n{proc.stdout}\n{proc.stderr}"
        ran.append(step["name"])
    assert any("dvc repro" in step.get("run", "") for step in job["steps"] if step.get("name") in ran)
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    assert "evaluate" in lock["stages"] and (clone / "metrics" / "summary.json").is_file()
