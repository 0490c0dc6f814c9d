"""`make gpu-check` cannot run here (no GPU), so its params are checked as check_params would check them."""

from __future__ import annotations

import argparse

import yaml

from minichatgpt.params import validate_all
from tests.conftest import ROOT, load_benchmark


def _gpu_check():
    return load_benchmark("gpu_check")


def test_the_gpu_check_params_are_a_valid_gpt2_124m_run_on_cuda() -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    args = argparse.Namespace(smoke=False, device="cuda", dtype="bfloat16", batch_size=128, iterations=5,
                              pretrain_steps=300)
    _gpu_check().check_params(raw, args)
    checked = validate_all(raw)
    pretrain = checked["pretrain"]
    assert (pretrain.n_layer, pretrain.n_head, pretrain.n_embd, pretrain.n_positions) == (12, 12, 768, 1024)
    assert (checked["runtime"].device, checked["runtime"].dtype) == ("cuda", "bfloat16")
    assert checked["ppo"].batch_size == 128 and checked["ppo"].iterations == 5
