"""The notebook API: PPOTrainer.step equals the DVC stages; TRL-legacy call conventions."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from minichatgpt.experiments.imdb import PPOConfig
from minichatgpt.models.policy import load_causal_lm, load_policy
from minichatgpt.notebook.trainer import PPOTrainer
from minichatgpt.pipeline.artifacts import write_table
from tests.conftest import ROOT, tool_env
from tests.rewards import keyword_score


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """checkpoints/0 as `pretrain` writes it: an (untrained) small GPT-2 and a BPE tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from minichatgpt.models.policy import PolicyWithValueHead, initial_state, save_policy
    from minichatgpt.models.tokenizer import train_bpe_tokenizer
    from minichatgpt.pipeline.data import load_reviews

    root = tmp_path_factory.mktemp("project")
    texts = load_reviews()["text"].to_pylist()[:300]
    tokenizer = train_bpe_tokenizer(texts, 400)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=32, n_positions=64,
                        resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=tokenizer.eos_token_id)
    ckpt = root / "checkpoints" / "0"
    save_policy(ckpt, PolicyWithValueHead(GPT2LMHeadModel(config)), tokenizer, state=initial_state())
    (ckpt / "value_head.safetensors").unlink()
    reward = root / "models" / "reward"
    reward.mkdir(parents=True)
    (reward / "reward_function.json").write_text(json.dumps({"function": "tests.rewards:keyword_score"}))
    return root


def make_trainer(root: Path, config: PPOConfig) -> PPOTrainer:
    policy, tokenizer, _ = load_policy(root / "checkpoints/0", config.seed)
    return PPOTrainer(config, policy, load_causal_lm(root / "checkpoints/0"), tokenizer)


def sample_batch(trainer: PPOTrainer, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    texts = ["This movie was", "I really", "The plot", "Worst film", "A lovely", "It is", "Nobody", "My kids"]
    queries = [torch.tensor(trainer.tokenizer(t)["input_ids"]) for t in (texts * 4)[:n]]
    responses = trainer.generate(queries, return_prompt=False, max_new_tokens=6)
    return queries, responses


def run_stage(name: str, args: list[str], cwd: Path) -> None:
    env = tool_env() | {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / f"{name}.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_step_gives_the_same_weights_as_the_stages(tiny_checkpoint: Path) -> None:
    config = PPOConfig(batch_size=8, mini_batch_size=4, forward_batch_size=8, learning_rate=1e-3, seed=3)
    trainer = make_trainer(tiny_checkpoint, config)
    queries, responses = sample_batch(trainer, 8)
    rollouts, _ = trainer.rollout_table(queries, responses)
    root = tiny_checkpoint
    write_table(rollouts, root / "runs/rollouts/1.parquet", "rollouts")
    params = {"runtime": {"threads": torch.get_num_threads()}, "generation": {"forward_batch_size": 8},
              "ppo": config.ppo_params().__dict__, "reward": {"model": "tests.rewards:keyword_score"}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    run_stage("score", ["--iter", "1", "--rollouts", "runs/rollouts/1.parquet", "--policy",
                        "checkpoints/0", "--out", "runs/scored/1.parquet"], root)
    run_stage("advantages", ["--iter", "1", "--scored", "runs/scored/1.parquet",
                             "--out", "runs/advantages/1.parquet"], root)
    run_stage("update", ["--iter", "1", "--policy", "checkpoints/0", "--advantages", "runs/advantages/1.parquet",
                         "--out", "checkpoints/1", "--metrics", "metrics/iters/1.json"], root)

    texts = [q + r for q, r in zip(rollouts["query"].to_pylist(), rollouts["response"].to_pylist())]
    scores = [torch.tensor(s) for s in keyword_score(texts)]
    before = {k: v.clone() for k, v in trainer.model.pretrained_model.state_dict().items()}
    stats = trainer.step(queries, responses, scores)

    stage_lm = load_file(root / "checkpoints/1/model.safetensors")
    ours = trainer.model.pretrained_model.state_dict()
    moved = 0
    for name, value in stage_lm.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(before[name], value))
    assert moved > 0, "the update changed no weight: the comparison would be vacuous"
    head = load_file(root / "checkpoints/1/value_head.safetensors")
    torch.testing.assert_close(trainer.model.v_head.weight, head["weight"], rtol=1e-5, atol=1e-6)
    state = json.loads((root / "checkpoints/1/state.json").read_text())
    assert trainer.kl_ctl.value == pytest.approx(state["kl_coef"], rel=1e-6)
    stage_stats = json.loads((root / "metrics/iters/1.json").read_text())
    assert stats["policy/clipfrac"] == pytest.approx(stage_stats["policy/clipfrac"], abs=1e-6)


def test_rewards_before_the_first_update_are_the_score_at_the_last_token(tiny_checkpoint: Path) -> None:
    trainer = make_trainer(tiny_checkpoint, PPOConfig(batch_size=4, forward_batch_size=4, mini_batch_size=2))
    queries, responses = sample_batch(trainer, 4)
    logprobs, ref_logprobs, values = trainer.batched_forward_pass(queries, responses)
    scores = [torch.tensor(1.5), torch.tensor(-2.0), torch.tensor(0.25), torch.tensor(3.0)]
    rewards, non_score = trainer.compute_rewards(scores, logprobs, ref_logprobs)
    for r, ns, s, resp in zip(rewards, non_score, scores, responses):
        assert len(r) == len(resp)
        assert torch.all(r[:-1] == 0) and torch.all(torch.signbit(r[:-1]))  # -0.0: -beta * 0
        assert r[-1].item() == pytest.approx(s.item())
        assert torch.all(ns == 0)


def test_loss_returns_the_legacy_stats_keys(tiny_checkpoint: Path) -> None:
    trainer = make_trainer(tiny_checkpoint, PPOConfig(batch_size=4, forward_batch_size=4, mini_batch_size=2))
    queries, responses = sample_batch(trainer, 1)
    logprobs, ref_logprobs, values = trainer.batched_forward_pass(queries, responses)
    rewards, _ = trainer.compute_rewards([torch.tensor(1.0)], logprobs, ref_logprobs)
    model_input = torch.cat([queries[0], responses[0]])
    loss_p, loss_v, stats = trainer.loss(logprobs[0], values[0], rewards[0], queries[0], responses[0], model_input)
    assert set(stats) == {
        "loss/policy", "loss/value", "loss/total", "policy/entropy", "policy/approxkl", "policy/policykl",
        "policy/clipfrac", "policy/advantages", "policy/advantages_mean", "policy/ratio", "returns/mean",
        "returns/var", "val/vpred", "val/error", "val/clipfrac", "val/mean", "val/var",
    }
    assert stats["policy/ratio"].allclose(torch.ones_like(stats["policy/ratio"]), atol=1e-5)
    assert loss_p.requires_grad and loss_v.requires_grad


@pytest.mark.parametrize(("change", "message"), [
    (lambda q, r, s: (q[:-1], r, s), "number of queries"),
    (lambda q, r, s: (q, r, [torch.tensor([1.0, 2.0])] + s[1:]), "scores[0] must be a scalar"),
    (lambda q, r, s: (q, [r[0].tolist()] + r[1:], s), "responses[0] must be a torch.Tensor"),
])
def test_step_safety_checker_names_the_culprit(tiny_checkpoint: Path, change, message) -> None:
    trainer = make_trainer(tiny_checkpoint, PPOConfig(batch_size=4, forward_batch_size=4, mini_batch_size=2))
    queries, responses = sample_batch(trainer, 4)
    q, r, s = change(queries, responses, [torch.tensor(0.0)] * 4)
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer._step_safety_checker(4, q, r, s)


def test_the_notebook_api_changes_no_process_wide_state(tiny_checkpoint: Path) -> None:
    """A notebook's other cells keep their threads, environment and logging; generating and stepping
    draw from the trainer's own seeded generators, not torch's global one."""
    import logging

    def state() -> tuple:
        return torch.get_num_threads(), dict(os.environ), logging.getLogger().level, list(logging.getLogger().handlers)

    before = state()
    trainer = make_trainer(tiny_checkpoint, PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1))
    rng = torch.get_rng_state().clone()
    queries, responses = sample_batch(trainer, 4)
    trainer.step(queries, responses, [torch.tensor(float(i)) for i in range(4)])
    assert torch.equal(torch.get_rng_state(), rng)
    assert state() == before
