"""Presets are complete, valid params files; the CI workflow runs the README's commands."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from minichatgpt.params import SECTIONS, iterations, section

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))


def keys(params: dict) -> dict[str, set[str]]:
    return {name: set(body) for name, body in params.items() if name != "iters"}


def test_there_are_presets() -> None:
    assert {p.stem for p in PRESETS} >= {"tiny", "gpt2-imdb"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_has_every_key_of_params_yaml_and_validates(preset: Path) -> None:
    params = yaml.safe_load(preset.read_text())
    assert keys(params) == keys(yaml.safe_load((ROOT / "params.yaml").read_text()))
    for name in SECTIONS:
        section(params, name)  # raises ParamsError naming the field
    assert list(iterations(params))


def test_workflow_is_valid_yaml_and_runs_the_readme_commands() -> None:
    workflow = yaml.safe_load((ROOT / ".github/workflows/repro.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    assert {"push", "pull_request"} <= set(triggers)
    steps = workflow["jobs"]["repro"]["steps"]
    commands = [line.strip() for step in steps for line in step.get("run", "").splitlines() if line.strip()]
    readme = (ROOT / "README.md").read_text()
    code_lines = {line.strip() for block in readme.split("```")[1::2] for line in block.splitlines()}
    missing = [c for c in commands if c not in code_lines and not c.startswith("git config")]
    assert not missing, f"workflow commands not in a README code block: {missing}"
    assert "make test" in commands and ".venv/bin/dvc repro" in commands
