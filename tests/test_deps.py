"""dvc.yaml's code dependencies are each stage's import closure (tests/import_closure.py).

A module a stage imports but does not list would let DVC restore outputs of other code; the
notebook API and the benchmarks, which no stage imports, must rerun nothing when edited.
"""

from __future__ import annotations

from pathlib import Path

import pathspec
import pytest

from tests.conftest import pipeline_stages
from tests.import_closure import ROOT, closure

STAGE_DEFS = pipeline_stages()
STAGES = {name: stage.get("do", stage) for name, stage in STAGE_DEFS.items()}
ONE_OFF = [name for name, stage in STAGE_DEFS.items() if "foreach" not in stage]
NOT_PIPELINE = ("minichatgpt/notebook/", "minichatgpt/experiments/", "benchmarks/", "notebooks/", "examples/")


def ignored() -> pathspec.PathSpec:
    return pathspec.PathSpec.from_lines("gitignore", (ROOT / ".dvcignore").read_text().splitlines())


def code_deps(stage: str) -> list[str]:
    return [d for d in STAGES[stage]["deps"] if d.startswith(("minichatgpt", "stages/"))]


def hashed_files(stage: str) -> set[str]:
    """The code files DVC hashes for a stage: its file deps, and its directory deps minus .dvcignore."""
    spec, out = ignored(), set()
    for dep in code_deps(stage):
        path = ROOT / dep
        files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
        out |= {str(p.relative_to(ROOT)) for p in files if not spec.match_file(str(p.relative_to(ROOT)))}
    return out


def script_of(stage: str) -> Path:
    return ROOT / "stages" / f"{stage}.py"


def test_every_stage_has_its_script() -> None:
    for stage in STAGES:
        assert f"stages/{stage}.py" in STAGES[stage]["deps"], stage
        assert f"stages/{stage}.py" in STAGES[stage]["cmd"], stage


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_dvc_hashes_every_file_the_stage_imports(stage: str) -> None:
    imported = {str(p.relative_to(ROOT)) for p in closure(script_of(stage))}
    missing = sorted(imported - hashed_files(stage))
    assert not missing, f"dvc.yaml: stage {stage} imports but does not depend on {missing}"


@pytest.mark.parametrize("stage", ONE_OFF)
def test_one_off_stages_list_exactly_their_import_closure(stage: str) -> None:
    """So that editing the PPO code does not retrain the base models (pretrain, train_reward)."""
    imported = sorted(str(p.relative_to(ROOT)) for p in closure(script_of(stage)))
    listed = sorted(code_deps(stage))
    assert listed == imported, f"dvc.yaml: deps of {stage} should be\n" + "\n".join(f"      - {f}" for f in imported)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_notebook_api_and_benchmarks_are_in_no_stage(stage: str) -> None:
    assert not [f for f in hashed_files(stage) if f.startswith(NOT_PIPELINE)]
    assert not [p for p in closure(script_of(stage)) if str(p.relative_to(ROOT)).startswith(NOT_PIPELINE)]


def test_the_closure_follows_function_level_imports(tmp_path: Path) -> None:
    """A module imported inside a function is part of the closure: the stage imports it when it runs."""
    script = tmp_path / "s.py"
    script.write_text("def main():\n    from minichatgpt.pipeline.evaluation import evaluate\n")
    found = {str(p.relative_to(ROOT)) for p in closure(script) if p != script}
    assert {"minichatgpt/__init__.py", "minichatgpt/pipeline/__init__.py",
            "minichatgpt/pipeline/evaluation.py", "minichatgpt/params/__init__.py"} <= found
    assert "minichatgpt/notebook/lab.py" not in found


@pytest.mark.e2e
def test_editing_the_notebook_api_reruns_nothing_but_editing_the_ppo_code_does(pipeline_repo: Path) -> None:
    from tests.conftest import sh

    edited = [pipeline_repo / "minichatgpt/notebook/lab.py", pipeline_repo / "minichatgpt/experiments/imdb.py"]
    ppo_code = pipeline_repo / "minichatgpt/ppo/update.py"
    originals = {path: path.read_text() for path in [*edited, ppo_code]}
    try:
        for path in edited:
            path.write_text(originals[path] + "\n# edited\n")
        assert "up to date" in sh(["dvc", "status"], pipeline_repo).stdout.lower()
        ppo_code.write_text(originals[ppo_code] + "\n# edited\n")
        changed = sh(["dvc", "status", "--json"], pipeline_repo).stdout
        assert "rollout@1" in changed and "update@2" in changed
        assert "pretrain" not in changed and "train_reward" not in changed and "prepare" not in changed
    finally:
        for path, text in originals.items():
            path.write_text(text)
