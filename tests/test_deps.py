"""dvc.yaml's code dependencies are each stage's import closure (tests/import_closure.py).

A module a stage imports but does not list would let DVC restore outputs of other code; the
notebook API and the benchmarks, which no stage imports, must rerun nothing when edited. The
iteration stages' code is the list in their data/inputs/<stage>.json (minichatgpt.pipeline.inputs),
which check_params writes, so check_params must depend on every file of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pathspec
import pytest

from minichatgpt.pipeline import inputs
from tests.conftest import pipeline_stages
from tests.import_closure import ROOT, closure

STAGE_DEFS = pipeline_stages()
STAGES = {name: stage.get("do", stage) for name, stage in STAGE_DEFS.items()}
ONE_OFF = [name for name, stage in STAGE_DEFS.items() if "foreach" not in stage and name != "check_params"]
ITERATION = [name for name, stage in STAGE_DEFS.items() if "foreach" in stage]
NOT_PIPELINE = ("minichatgpt/notebook/", "minichatgpt/experiments/", "benchmarks/", "notebooks/", "examples/")


def ignored() -> pathspec.PathSpec:
    return pathspec.PathSpec.from_lines("gitignore", (ROOT / ".dvcignore").read_text().splitlines())


def code_deps(stage: str) -> list[str]:
    return [d for d in STAGES[stage]["deps"] if d.startswith(("minichatgpt", "stages/"))]


def dvc_hashed(deps: list[str]) -> set[str]:
    """The files DVC hashes for these deps: the file deps, and the directory deps' files minus .dvcignore."""
    spec, out = ignored(), set()
    for dep in deps:
        path = ROOT / dep
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        out |= {p.relative_to(ROOT).as_posix() for p in files if not spec.match_file(p.relative_to(ROOT).as_posix())}
    return out


def hashed_files(stage: str) -> set[str]:
    """The code files whose change reruns a stage: DVC's hash of its code deps, or for an iteration
    stage the files its data/inputs/<stage>.json records."""
    if stage in ITERATION:
        return set(inputs.code_files(ROOT, stage))
    return dvc_hashed(code_deps(stage))


def script_of(stage: str) -> Path:
    return ROOT / "stages" / f"{stage}.py"


def test_every_stage_has_its_script() -> None:
    for stage in STAGES:
        assert f"stages/{stage}.py" in hashed_files(stage), stage
        assert f"stages/{stage}.py" in STAGES[stage]["cmd"], stage


@pytest.mark.parametrize("stage", ITERATION)
def test_iteration_stages_depend_on_and_check_their_inputs_file(stage: str) -> None:
    path = inputs.path_of(stage)
    assert path in STAGES[stage]["deps"] and f"--inputs {path}" in STAGES[stage]["cmd"]
    assert not STAGES[stage].get("params") and not [d for d in code_deps(stage)], \
        "params and code reach an iteration stage through its inputs file only"
    assert path in [next(iter(o)) if isinstance(o, dict) else o for o in STAGES["check_params"]["outs"]]


def test_check_params_depends_on_all_the_code_the_inputs_files_record() -> None:
    """An edit of any of it reruns check_params, which rewrites the inputs files, which reruns the stages."""
    recorded = set().union(*(inputs.code_files(ROOT, stage) for stage in ITERATION))
    missing = sorted(recorded - dvc_hashed(code_deps("check_params")))
    assert not missing, f"dvc.yaml: check_params does not depend on {missing}"
    own = {str(p.relative_to(ROOT)) for p in closure(script_of("check_params"))}
    assert own <= dvc_hashed(code_deps("check_params"))


def test_inputs_record_the_package_as_dvc_hashes_it() -> None:
    """The same files as a `minichatgpt` directory dependency: .dvcignore's exclusions and no more."""
    package = set(inputs.code_files(ROOT, "update")) - {"stages/update.py"}
    assert package == dvc_hashed(["minichatgpt"])


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
        before = set(json.loads(sh(["dvc", "status", "--json"], pipeline_repo).stdout))
        assert "check_params" in before and not [s for s in before if "@" in s]  # until it has run
        sh(["dvc", "repro", "check_params"], pipeline_repo)  # records the new code in data/inputs/*.json
        changed = sh(["dvc", "status", "--json"], pipeline_repo).stdout
        assert "rollout@1" in changed and "update@2" in changed
        assert "pretrain" not in changed and "train_reward" not in changed and "prepare" not in changed
    finally:
        for path, text in originals.items():
            path.write_text(text)
        sh(["dvc", "repro", "check_params"], pipeline_repo)
    assert "up to date" in sh(["dvc", "status"], pipeline_repo).stdout.lower()
