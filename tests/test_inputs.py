"""data/inputs/<stage>.json: what an iteration stage runs with, and its refusal to run with anything else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from minichatgpt.pipeline import inputs
from minichatgpt.pipeline.inputs import InputsChangedError, compute, param_values, verify, write_all
from tests.conftest import ROOT, write_params


@pytest.fixture
def root(tmp_path: Path, tiny_params: dict) -> Path:
    """A checkout's code and params.yaml, with the inputs files check_params would write."""
    shutil.copytree(ROOT / "minichatgpt", tmp_path / "minichatgpt", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "stages", tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    write_params(tmp_path / "params.yaml", tiny_params)
    write_all(tmp_path, yaml.safe_load((tmp_path / "params.yaml").read_text()))
    return tmp_path


def edit_params(root: Path, section: str, key: str, value: object) -> None:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw[section][key] = value
    write_params(root / "params.yaml", raw)


def test_a_setting_is_one_value_and_a_section_all_of_its_values(tiny_params: dict) -> None:
    values = param_values(tiny_params, ("ppo.lam", "lora"))
    assert values["ppo.lam"] == tiny_params["ppo"]["lam"]
    assert values["lora"]["r"] == 0 and set(values["lora"]) == {"r", "alpha", "dropout", "target_modules"}


def test_each_file_records_only_its_stage_s_settings(root: Path) -> None:
    for stage, keys in inputs.STAGE_PARAMS.items():
        recorded = json.loads((root / inputs.path_of(stage)).read_text())
        assert recorded["stage"] == stage and sorted(recorded["params"]) == sorted(keys)
        assert f"stages/{stage}.py" in recorded["code"] and "minichatgpt/ppo/steps.py" in recorded["code"]
        assert not [f for f in recorded["code"] if f.startswith(inputs.NOT_RUN) or f.endswith(".pyc")]


def test_the_stage_runs_with_the_values_it_checked(root: Path) -> None:
    raw = verify(root / inputs.path_of("advantages"), root / "params.yaml", root)
    assert raw == yaml.safe_load((root / "params.yaml").read_text())


def test_a_setting_another_stage_reads_changes_nothing_here(root: Path) -> None:
    edit_params(root, "ppo", "lam", 0.5)  # advantages reads it, rollout does not
    verify(root / inputs.path_of("rollout"), root / "params.yaml", root)
    with pytest.raises(InputsChangedError, match=r"ppo\.lam is 0\.5 but .*advantages\.json .*records 0\.95"):
        verify(root / inputs.path_of("advantages"), root / "params.yaml", root)


def test_code_edited_or_added_after_check_params_is_refused(root: Path) -> None:
    steps = root / "minichatgpt/ppo/steps.py"
    original = steps.read_text()
    steps.write_text(original + "\n# edited\n")
    with pytest.raises(InputsChangedError, match=r"minichatgpt/ppo/steps\.py: changed since check_params"):
        verify(root / inputs.path_of("update"), root / "params.yaml", root)
    steps.write_text(original)
    verify(root / inputs.path_of("update"), root / "params.yaml", root)
    (root / "minichatgpt/ppo/extra.py").write_text("")
    with pytest.raises(InputsChangedError, match=r"minichatgpt/ppo/extra\.py: changed"):
        verify(root / inputs.path_of("update"), root / "params.yaml", root)


def test_a_missing_or_foreign_inputs_file_is_named(root: Path) -> None:
    with pytest.raises(InputsChangedError, match=r"nothing\.json: not found; `dvc repro` writes it"):
        verify(root / "data/inputs/nothing.json", root / "params.yaml", root)
    (root / "data/params_schema.json").write_text("{}")
    with pytest.raises(InputsChangedError, match=r"params_schema\.json: not an inputs file"):
        verify(root / "data/params_schema.json", root / "params.yaml", root)


def test_the_files_are_a_function_of_code_and_params(root: Path, tiny_params: dict) -> None:
    """Byte-identical when written again (DVC hashes them), whatever the checkout's absolute path."""
    before = {stage: (root / inputs.path_of(stage)).read_bytes() for stage in inputs.STAGE_PARAMS}
    moved = root.parent / "elsewhere"
    shutil.move(root, moved)
    write_all(moved, yaml.safe_load((moved / "params.yaml").read_text()))
    assert {stage: (moved / inputs.path_of(stage)).read_bytes() for stage in inputs.STAGE_PARAMS} == before
    assert compute(moved, "score", tiny_params)["params"]["reward.model"] == tiny_params["reward"]["model"]
