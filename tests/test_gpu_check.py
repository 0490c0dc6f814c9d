"""`make gpu-check` cannot run here (no GPU), so its params are checked as check_params would check them."""

from __future__ import annotations

import argparse
import importlib.util
import sys

import yaml

from minichatgpt.params import validate_all
from tests.conftest import ROOT


def _gpu_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


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
