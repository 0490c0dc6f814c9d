"""Shared fixtures: a tiny params set and a temporary git+DVC copy of the pipeline."""

from __future__ import annotations

from minichatgpt.runtime import hermetic

# Before torch, numpy or pyarrow load: in-process results (PPOTrainer, the math tests) then use the
# kernels the stage processes use, so the two can be compared bit for bit.
hermetic.pin_this_process()

import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from minichatgpt.params.presets import compose  # noqa: E402
from minichatgpt.pipeline import iterations  # noqa: E402
from minichatgpt.pipeline.report import offline_html_template  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

TINY_PARAMS = compose(yaml.safe_load((ROOT / "presets" / "tiny.yaml").read_text()))
"""The tiny preset over the defaults (the CI reproduction runs it too): every key of params.yaml."""


def pipeline_stages() -> dict[str, dict]:
    """Every stage as written: dvc.yaml's, and the iteration stages of the template (``foreach`` + ``do``)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return stages | yaml.safe_load((ROOT / iterations.TEMPLATE).read_text())["stages"]


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


def sh(cmd: list[str], cwd: Path, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=tool_env() | (env or {}), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def write_params(path: Path, params: dict) -> None:
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def out_hashes_of(lock_text: str) -> dict[str, str]:
    """``stage:path -> md5`` of every output in one dvc.lock."""
    lock = yaml.safe_load(lock_text)
    return {f"{s}:{o['path']}": o["md5"] for s, b in lock["stages"].items() for o in b.get("outs", [])}


def lock_files(repo: Path, rev: str | None = None) -> list[str]:
    """The pipeline's dvc.lock files: the root one and one per block of iterations (in ``rev`` if given)."""
    if rev is None:
        return ["dvc.lock"] + [str(p.relative_to(repo)) for p in iterations.lock_files(repo)]
    listed = sh(["git", "ls-tree", "-r", "--name-only", rev], repo).stdout.split()
    return [f for f in listed if f == "dvc.lock" or (f.startswith(f"{iterations.DIR}/") and f.endswith("/dvc.lock"))]


def out_hashes(repo: Path, rev: str | None = None) -> dict[str, str]:
    """``stage:path -> md5`` of every output in every dvc.lock of the workspace (or of ``rev``)."""
    out: dict[str, str] = {}
    for name in lock_files(repo, rev):
        text = (repo / name).read_text() if rev is None else sh(["git", "show", f"{rev}:{name}"], repo).stdout
        out |= out_hashes_of(text)
    return out


def stages_run(output: str) -> set[str]:
    """Stages a `dvc repro` / `dvc exp run` ran, by name (``rollout@1``, not its dvc.yaml's path)."""
    return {iterations.stage_name(address) for address in re.findall(r"Running stage '([^']+)'", output)}


def metrics_of(repo: Path) -> dict[str, object]:
    """Every metrics and plot file of a run (git-tracked, uncached) and each iteration's statistics."""
    files = sorted((repo / "metrics").glob("*.json")) + sorted((repo / "metrics/iters").glob("*.json"))
    return {str(f.relative_to(repo)): json.loads(f.read_text()) for f in files}


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (it imports its neighbours, e.g. ``common``)."""
    import importlib.util

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


_offline_page = functools.cache(offline_html_template)
"""bundling Vega takes ~2 s: once per test session, not once per repository"""


def make_pipeline_repo(dest: Path, params: dict) -> Path:
    """A git + DVC repository holding this project's pipeline and the given params."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, dest / name)
    for name in ("stages", "minichatgpt"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (dest / iterations.DIR).mkdir()
    shutil.copy(ROOT / iterations.TEMPLATE, dest / iterations.TEMPLATE)
    write_params(dest / "params.yaml", params)
    iterations.write(dest, params["ppo"]["iterations"])
    sh(["git", "init", "-q", "-b", "main"], dest)
    sh(["dvc", "init", "-q"], dest)
    sh(["dvc", "config", "core.analytics", "false"], dest)
    # the project's plot templates and offline page, as a clone of this repository has them
    shutil.copytree(ROOT / ".dvc" / "plots", dest / ".dvc" / "plots", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("offline.html"))
    (dest / ".dvc" / "plots" / "offline.html").write_text(_offline_page(), encoding="utf-8")
    shutil.copy(ROOT / ".dvc" / ".gitignore", dest / ".dvc" / ".gitignore")
    sh(["dvc", "config", "plots.html_template", "plots/offline.html"], dest)
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
