"""Legacy-PPO options, each against an independent or hand-computed reference."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from minichatgpt.core import RunningMoments, gae, process_scores, whiten
from minichatgpt.models.policy import PolicyWithValueHead
from minichatgpt.params import PPOParams
from minichatgpt.ppo.generation import forward_responses, pack
from minichatgpt.ppo.steps import advantages, full_kl, pad_floats
from minichatgpt.ppo.update import PPOBatch, ppo_update

PAD = 0


def tiny_policy(seed: int = 0) -> PolicyWithValueHead:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=40, n_layer=1, n_head=2, n_embd=16, n_positions=32,
                        resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return PolicyWithValueHead(GPT2LMHeadModel(config), seed=seed).eval()


def tiny_batch(policy: PolicyWithValueHead, n: int = 8, logprob_shift: float = 0.0) -> PPOBatch:
    rng = np.random.default_rng(0)
    queries = [rng.integers(1, 40, size=int(rng.integers(1, 4))).tolist() for _ in range(n)]
    responses = [rng.integers(1, 40, size=int(rng.integers(2, 6))).tolist() for _ in range(n)]
    with torch.no_grad():
        out = forward_responses(policy, pack(queries, responses, PAD))
    mask = out["mask"]
    adv = torch.from_numpy(rng.normal(size=mask.shape).astype(np.float32)) * mask
    return PPOBatch(queries, responses, (out["logprobs"] - logprob_shift) * mask, out["values"] * mask, adv,
                    (out["values"] + adv) * mask, mask)


def params(**kw) -> PPOParams:
    base = dict(learning_rate=1e-2, batch_size=8, mini_batch_size=4, ppo_epochs=2)
    p = PPOParams(**(base | kw))
    p.validate()
    return p


def run_update(p: PPOParams, shift: float = 0.0, sgd: bool = False) -> tuple[PolicyWithValueHead, dict]:
    policy = tiny_policy()
    batch = tiny_batch(policy, logprob_shift=shift)
    kind = torch.optim.SGD if sgd else torch.optim.Adam
    opt = kind(policy.parameters(), lr=p.learning_rate)
    stats = ppo_update(policy, opt, batch, p, torch.Generator().manual_seed(0), PAD, progress=False)
    return policy, stats


def flat(policy: torch.nn.Module) -> torch.Tensor:
    return torch.cat([x.detach().reshape(-1) for x in policy.parameters()])


def test_gradient_accumulation_gives_the_unaccumulated_update() -> None:
    # SGD: the update is the gradient itself (Adam would amplify float noise in near-zero gradients)
    one, _ = run_update(params(gradient_accumulation_steps=1, learning_rate=0.5), sgd=True)
    two, _ = run_update(params(gradient_accumulation_steps=2, learning_rate=0.5), sgd=True)
    four, _ = run_update(params(gradient_accumulation_steps=4, learning_rate=0.5), sgd=True)
    untouched = flat(tiny_policy())
    assert not torch.allclose(flat(one), untouched)
    torch.testing.assert_close(flat(two), flat(one), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flat(four), flat(one), rtol=1e-5, atol=1e-6)


def test_ratio_spikes_skip_the_minibatch_and_are_counted() -> None:
    policy, stats = run_update(params(), shift=5.0)  # old logprobs 5 nats lower: ratio e^5 > 10
    assert stats["ppo/skipped_minibatches"] == stats["ppo/minibatches"] == 4
    torch.testing.assert_close(flat(policy), flat(tiny_policy()))
    _, normal = run_update(params())
    assert normal["ppo/skipped_minibatches"] == 0


def test_early_stopping_stops_when_policy_kl_exceeds_1_5_target() -> None:
    _, full = run_update(params())
    assert full["ppo/minibatches"] == 4 and full["ppo/early_stopped"] == 0
    _, stopped = run_update(params(early_stopping=True, target_kl=1e-5))
    # the first minibatch sees the un-updated policy (KL ~1e-8: its rows are recomputed in a smaller
    # batch, and MKL's portable sgemm rounds by shape); the second, after one step, exceeds the target
    assert stopped["ppo/minibatches"] == 2 and stopped["ppo/early_stopped"] == 1


def test_running_moments_equal_statistics_of_everything_seen() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(2.0, 3.0, size=7), rng.normal(-1.0, 0.5, size=5)
    m = RunningMoments().update(torch.tensor(a)).update(torch.tensor(b))
    both = np.concatenate([a, b])
    assert m.mean == pytest.approx(both.mean(), rel=1e-9)
    assert m.std == pytest.approx(both.std(ddof=1), rel=1e-9)
    assert m.count == pytest.approx(12)


def test_process_scores_penalty_scaling_norm_clip_by_hand() -> None:
    scores, eos = torch.tensor([1.0, 3.0, -2.0, 6.0]), torch.tensor([True, False, True, False])
    penalized, _ = process_scores(scores, eos, RunningMoments(), missing_eos_penalty=1.0)
    assert penalized.tolist() == [1.0, 2.0, -2.0, 5.0]
    # scaling by the std of [1, 3, -2, 6] (mean 2, unbiased var (1+1+16+16)/3 = 34/3)
    std = math.sqrt(34 / 3)
    scaled, moments = process_scores(scores, eos, RunningMoments(), use_score_scaling=True)
    assert scaled.tolist() == pytest.approx([1 / std, 3 / std, -2 / std, 6 / std], rel=1e-5)
    assert moments.mean == pytest.approx(2.0)
    normed, _ = process_scores(scores, eos, RunningMoments(), use_score_scaling=True, use_score_norm=True)
    assert normed.tolist() == pytest.approx([-1 / std, 1 / std, -4 / std, 4 / std], rel=1e-5)
    clipped, untouched = process_scores(scores, eos, RunningMoments(), score_clip=2.5)
    assert clipped.tolist() == [1.0, 2.5, -2.0, 2.5]
    assert untouched == RunningMoments()  # moments only move when scaling is on


def scored_table(rewards: list[list[float]], values: list[list[float]]) -> pa.Table:
    floats = pa.list_(pa.float32())
    return pa.table({"rewards": pa.array(rewards, floats), "values": pa.array(values, floats)})


def test_whiten_rewards_whitens_before_gae_keeping_the_mean() -> None:
    rewards, values = [[0.0, -0.1, 2.0], [0.3, 1.0]], [[0.5, 0.2, 0.1], [0.0, -0.4]]
    table = advantages(scored_table(rewards, values), gamma=1.0, lam=0.9, whiten_rewards=True)
    r, mask = pad_floats(rewards)
    flat_r = [x for row in rewards for x in row]
    mean, std = np.mean(flat_r), np.std(flat_r, ddof=1)
    expected_r = (r - mean) / math.sqrt(std**2 + 1e-8) + mean
    adv, _ = gae(expected_r * mask, pad_floats(values)[0], 1.0, 0.9, mask)
    expected = whiten(adv, mask=mask)
    got = pad_floats(table["advantages"].to_pylist())[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    plain = advantages(scored_table(rewards, values), gamma=1.0, lam=0.9)
    assert plain["advantages"].to_pylist() != table["advantages"].to_pylist()


def test_full_kl_matches_an_independent_sum_over_the_vocabulary() -> None:
    policy, reference = tiny_policy(0), tiny_policy(1).pretrained_model
    queries, responses = [[1, 2], [3]], [[4, 5, 6], [7, 8]]
    got = full_kl(policy, reference, queries, responses, PAD, batch_size=2)
    for q, r, row in zip(queries, responses, got):
        ids = torch.tensor([q + r])
        with torch.no_grad():
            p = torch.log_softmax(policy.pretrained_model(ids).logits[0], -1)
            s = torch.log_softmax(reference(ids).logits[0], -1)
        for k, value in enumerate(row):
            pos = len(q) - 1 + k
            expected = sum(math.exp(p[pos, v]) * (p[pos, v] - s[pos, v]) for v in range(p.shape[-1]))
            assert value == pytest.approx(float(expected), abs=1e-5)
            assert value >= -1e-6
