"""Shared fixtures: a tiny params set and a temporary git+DVC copy of the pipeline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY_OVERRIDES = {
    "runtime": {"threads": 1},
    "data": {"seed": 0, "max_reviews": 1200, "eval_prompts": 32, "input_min_text_length": 2,
             "input_max_text_length": 8},
    "pretrain": {"vocab_size": 400, "n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 64,
                 "block_size": 32, "batch_size": 8, "learning_rate": 0.003, "max_steps": 15, "seed": 0},
    "reward": {"vocab_size": 400, "n_layer": 1, "n_head": 2, "n_embd": 32, "max_length": 32,
               "batch_size": 8, "learning_rate": 0.001, "max_steps": 15, "seed": 0},
    "generation": {"output_min_length": 4, "output_max_length": 8, "forward_batch_size": 8},
    "ppo": {"learning_rate": 0.0003, "batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 2, "seed": 0},
    "evaluate": {"seed": 1, "samples": 2},
    "iters": {"1": {"prev": "0"}, "2": {"prev": "1"}},
}


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) and key != "iters" else value
    return out


TINY_PARAMS = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY_OVERRIDES)
"""The repository's params.yaml (every key DVC expects) with tiny sizes for fast tests."""


def tool_env() -> dict[str, str]:
    """Environment whose ``python`` and ``dvc`` are this interpreter's."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    # stage processes run cold (no warm worker, whose speed would move the kill points of
    # test_faults); tests/test_worker.py covers the worker path
    env.setdefault("MINICHATGPT_WORKER", "0")
    env.setdefault("GIT_AUTHOR_NAME", "minichatgpt tests")
    env.setdefault("GIT_AUTHOR_EMAIL", "tests@minichatgpt.invalid")
    env.setdefault("GIT_COMMITTER_NAME", "minichatgpt tests")
    env.setdefault("GIT_COMMITTER_EMAIL", "tests@minichatgpt.invalid")
    return env


def sh(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=tool_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def write_params(path: Path, params: dict) -> None:
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_pipeline_repo(dest: Path, params: dict) -> Path:
    """A git + DVC repository holding this project's pipeline and the given params."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, dest / name)
    for name in ("stages", "minichatgpt"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    write_params(dest / "params.yaml", params)
    sh(["git", "init", "-q", "-b", "main"], dest)
    sh(["dvc", "init", "-q"], dest)
    sh(["dvc", "config", "core.analytics", "false"], dest)
    sh(["git", "add", "-A"], dest)
    sh(["git", "commit", "-qm", "pipeline"], dest)
    return dest


@pytest.fixture(scope="session")
def tiny_params() -> dict:
    return yaml.safe_load(yaml.safe_dump(TINY_PARAMS))


@pytest.fixture(scope="session")
def pipeline_repo(tmp_path_factory) -> Path:
    """The tiny pipeline reproduced once and committed; tests must restore what they change."""
    repo = make_pipeline_repo(tmp_path_factory.mktemp("pipeline"), TINY_PARAMS)
    first = sh(["dvc", "repro"], repo)
    (repo / ".git" / "first_repro.log").write_text(first.stdout)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "baseline run"], repo)
    return repo
