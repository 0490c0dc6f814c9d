"""`runtime.launcher: accelerate launch ...`: rollout and update as 2 data-parallel processes
(torchrun underneath, gloo on this CPU machine) give the single-process results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_PARAMS, make_pipeline_repo, sh

pytestmark = pytest.mark.e2e

LAUNCHER = "accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no"


def test_two_processes_reproduce_the_single_process_iteration(pipeline_repo: Path, tmp_path: Path) -> None:
    params = json.loads(json.dumps(TINY_PARAMS))
    params["runtime"]["launcher"] = LAUNCHER
    repo = make_pipeline_repo(tmp_path / "parallel", params)
    run = sh(["dvc", "repro", "iterations/0001-0010/dvc.yaml:update@1"], repo)
    assert f"> {LAUNCHER} stages/rollout.py" in run.stdout and f"> {LAUNCHER} stages/update.py" in run.stdout
    assert "rank=1" in run.stderr + run.stdout  # the second process really ran

    # rollout: chunks are seeded independently of the process that generates them
    single = pipeline_repo  # the same tiny params, one process
    assert (repo / "runs/rollouts/1.parquet").read_bytes() == (single / "runs/rollouts/1.parquet").read_bytes()
    # update: gradients summed over processes = the single-process accumulation, up to float order
    parallel_w = load_file(repo / "checkpoints/1/model.safetensors")
    single_w = load_file(single / "checkpoints/1/model.safetensors")
    start_w = load_file(single / "checkpoints/0/model.safetensors")
    moved = max((single_w[k] - start_w[k]).abs().max().item() for k in start_w)
    assert moved > 1e-4
    for name, weight in single_w.items():
        torch.testing.assert_close(parallel_w[name], weight, rtol=1e-4, atol=1e-5)
    metrics = json.loads((repo / "metrics/iters/1.json").read_text())
    reference = json.loads((single / "metrics/iters/1.json").read_text())
    assert metrics["ppo/minibatches"] == reference["ppo/minibatches"]
    # token-level stats pool every token whichever process saw it (per-part means like loss/total
    # average over differently sized parts, so they are not comparable)
    for key in ("policy/ratio", "policy/advantages", "env/reward_mean"):
        assert metrics[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-6), key
