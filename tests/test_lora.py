"""LoRA (peft) policy: checkpoints hold only adapters, and the pipeline still learns from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minichatgpt.models.policy import load_policy
from tests.conftest import TINY_PARAMS, make_pipeline_repo, sh

pytestmark = pytest.mark.e2e


def test_lora_pipeline_checkpoints_hold_adapters_over_the_base(tmp_path: Path, monkeypatch) -> None:
    params = json.loads(json.dumps(TINY_PARAMS))
    params["lora"] = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "auto"}
    repo = make_pipeline_repo(tmp_path / "repo", params)
    sh(["dvc", "repro"], repo)

    for i in ("1", "2"):
        files = {p.name for p in (repo / "checkpoints" / i).iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json", "value_head.safetensors"} <= files
        assert "model.safetensors" not in files
        assert json.loads((repo / f"checkpoints/{i}/source.json").read_text()) == {"model": "checkpoints/0"}
    adapters = load_file(repo / "checkpoints/2/adapter_model.safetensors")
    assert adapters and all("lora_" in name for name in adapters)
    # the adapters trained: B started at zero and moved
    assert any(t.abs().max() > 0 for name, t in adapters.items() if "lora_B" in name)
    metrics = json.loads((repo / "metrics/iters/2.json").read_text())
    base_params = sum(t.numel() for t in load_file(repo / "checkpoints/0/model.safetensors").values())
    assert 0 < metrics["ppo/trainable_parameters"] < 0.2 * base_params
    # the merged policy differs from the base only through the adapters
    monkeypatch.chdir(repo)  # source.json names the base relative to the project root, as stages run
    merged, _, state = load_policy("checkpoints/2", seed=0)
    base, _, _ = load_policy("checkpoints/0", seed=0)
    assert state["iteration"] == 2
    changed = [n for n, p in merged.pretrained_model.named_parameters()
               if not torch.equal(p, dict(base.pretrained_model.named_parameters())[n])]
    assert changed and all("attn" in n for n in changed)  # peft's GPT-2 default: c_attn
    assert json.loads((repo / "metrics/summary.json").read_text())["n_prompts"] == params["data"]["eval_prompts"]
