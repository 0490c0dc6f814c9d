"""A model directory is weights and configs, never code: code runs only where params.yaml names it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minichatgpt.models.reward import FUNCTION_FILE, SOURCE_FILE, RewardModel
from minichatgpt.models.sources import ModelError


def planted_directory(root: Path, marker: Path) -> Path:
    """A downloaded 'model' whose files ask the loader to import and run a module shipped beside them."""
    root.mkdir()
    (root / "payload.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
                                     "def score(texts):\n    return [1.0 for _ in texts]\n")
    (root / FUNCTION_FILE).write_text(json.dumps({"function": "payload:score"}))
    return root


def test_a_reward_function_file_in_a_directory_is_refused_and_nothing_runs(tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "payload-ran"
    model_dir = planted_directory(tmp_path / "downloaded", marker)
    monkeypatch.chdir(model_dir)  # even with the payload importable from the working directory
    with pytest.raises(ModelError, match="never from a model directory") as err:
        RewardModel(model_dir)
    assert str(model_dir) in str(err.value) and "payload:score" in str(err.value)
    assert not marker.exists()


def test_a_source_file_naming_a_function_is_refused(tmp_path: Path) -> None:
    model_dir = tmp_path / "reward"
    model_dir.mkdir()
    (model_dir / SOURCE_FILE).write_text(json.dumps({"model": "examples.lexicon_reward:score"}))
    with pytest.raises(ModelError, match="is not a model"):
        RewardModel(model_dir)


def test_a_function_named_directly_runs() -> None:
    """As score and evaluate call it with params.yaml's reward.model."""
    scores = RewardModel("examples.lexicon_reward:score").score(["a great and fun film", "boring and awful"])
    assert scores[0] > 0 > scores[1]
