"""Unit tests of the pure PPO math in minichatgpt.core against plain-Python references."""

from __future__ import annotations

import math
import random

import pytest
import torch

from minichatgpt.core import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    kl_penalty,
    logprobs_from_logits,
    per_token_rewards,
    policy_loss,
    value_loss,
    whiten,
)
from minichatgpt.params import PPOParams

F64 = torch.float64


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def ref_gae(rewards: list[float], values: list[float], gamma: float, lam: float, mask: list[int]):
    """Plain-Python GAE for one right-padded row: returns (advantages, returns)."""
    n = sum(mask)
    assert mask == [1] * n + [0] * (len(mask) - n)
    adv = [0.0] * len(rewards)
    last = 0.0
    for i in reversed(range(n)):
        next_value = values[i + 1] if i + 1 < n else 0.0
        delta = rewards[i] + gamma * next_value - values[i]
        last = delta + gamma * lam * last
        adv[i] = last
    ret = [adv[i] + values[i] if i < n else 0.0 for i in range(len(rewards))]
    return adv, ret


def rand_row(rng: random.Random, length: int) -> list[float]:
    return [rng.uniform(-2.0, 2.0) for _ in range(length)]


GAMMA_LAM = [(1.0, 0.95), (0.99, 0.95), (0.0, 0.95), (1.0, 0.0), (0.0, 0.0), (1.0, 1.0), (0.5, 0.7)]


@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_1d_matches_reference(gamma, lam, seed):
    rng = random.Random(seed)
    length = rng.randint(1, 9)
    rewards, values = rand_row(rng, length), rand_row(rng, length)
    adv, ret = gae(t(rewards), t(values), gamma, lam)
    exp_adv, exp_ret = ref_gae(rewards, values, gamma, lam, [1] * length)
    assert adv.shape == (length,) and ret.shape == (length,)
    assert adv.tolist() == pytest.approx(exp_adv, rel=1e-12, abs=1e-12)
    assert ret.tolist() == pytest.approx(exp_ret, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
@pytest.mark.parametrize("seed", [3, 4])
def test_gae_batched_with_right_padding(gamma, lam, seed):
    rng = random.Random(seed)
    batch, length = 4, 7
    lengths = [length, 1] + [rng.randint(1, length) for _ in range(batch - 2)]
    rewards = [rand_row(rng, length) for _ in range(batch)]
    values = [rand_row(rng, length) for _ in range(batch)]  # padding holds junk on purpose
    mask = [[1] * n + [0] * (length - n) for n in lengths]
    adv, ret = gae(t(rewards), t(values), gamma, lam, mask=torch.tensor(mask))
    assert adv.shape == (batch, length)
    for b in range(batch):
        exp_adv, exp_ret = ref_gae(rewards[b], values[b], gamma, lam, mask[b])
        assert adv[b].tolist() == pytest.approx(exp_adv, rel=1e-12, abs=1e-12)
        for i in range(length):
            if mask[b][i]:
                assert ret[b, i].item() == pytest.approx(exp_ret[i], rel=1e-12, abs=1e-12)
                assert ret[b, i].item() == pytest.approx(adv[b, i].item() + values[b][i], abs=1e-12)
            else:
                assert adv[b, i].item() == 0.0


def test_gae_unmasked_batch_equals_rows():
    rng = random.Random(7)
    rewards = [rand_row(rng, 5) for _ in range(3)]
    values = [rand_row(rng, 5) for _ in range(3)]
    adv, _ = gae(t(rewards), t(values), 0.9, 0.8)
    for b in range(3):
        assert adv[b].tolist() == pytest.approx(ref_gae(rewards[b], values[b], 0.9, 0.8, [1] * 5)[0], abs=1e-12)


def test_gae_hand_computed():
    # T=3, gamma=0.5, lam=0.5 (gamma*lam=0.25), r=[1,0,2], V=[0.5,1,1], V after the end=0.
    # delta2 = 2 + 0.5*0 - 1   = 1.0          A2 = 1.0
    # delta1 = 0 + 0.5*1 - 1   = -0.5         A1 = -0.5 + 0.25*1.0   = -0.25
    # delta0 = 1 + 0.5*1 - 0.5 = 1.0          A0 = 1.0 + 0.25*-0.25  = 0.9375
    # returns = A + V = [1.4375, 0.75, 2.0]
    adv, ret = gae(t([1.0, 0.0, 2.0]), t([0.5, 1.0, 1.0]), 0.5, 0.5)
    assert adv.tolist() == pytest.approx([0.9375, -0.25, 1.0], abs=1e-12)
    assert ret.tolist() == pytest.approx([1.4375, 0.75, 2.0], abs=1e-12)


def test_gae_shape_mismatch_raises():
    with pytest.raises(ValueError):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), 1.0, 0.95)


def plain_mean_var(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def test_whiten_zero_mean_unit_variance():
    rng = random.Random(11)
    xs = [rng.gauss(3.0, 2.5) for _ in range(50)]
    out = whiten(t(xs)).tolist()
    m, v = plain_mean_var(xs)
    assert out == pytest.approx([(x - m) / math.sqrt(v + 1e-8) for x in xs], rel=1e-10, abs=1e-12)
    om, ov = plain_mean_var(out)
    assert om == pytest.approx(0.0, abs=1e-10)
    assert ov == pytest.approx(1.0, rel=1e-6)


def test_whiten_without_mean_shift_keeps_mean():
    rng = random.Random(12)
    xs = [rng.gauss(-4.0, 0.5) for _ in range(40)]
    out = whiten(t(xs), shift_mean=False).tolist()
    m, v = plain_mean_var(xs)
    om, ov = plain_mean_var(out)
    assert om == pytest.approx(m, rel=1e-10)
    assert ov == pytest.approx(1.0, rel=1e-6)
    assert v != pytest.approx(1.0, rel=1e-2)  # the input scale really changed


def test_whiten_masked_ignores_masked_positions():
    rng = random.Random(13)
    xs = [[rng.gauss(1.0, 2.0) for _ in range(6)] for _ in range(3)]
    mask = [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    out = whiten(t(xs), mask=torch.tensor(mask))
    kept = [xs[b][i] for b in range(3) for i in range(6) if mask[b][i]]
    m, v = plain_mean_var(kept)
    for b in range(3):
        for i in range(6):
            expected = (xs[b][i] - m) / math.sqrt(v + 1e-8) if mask[b][i] else 0.0
            assert out[b, i].item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    junk = [[x if mask[b][i] else 1e6 for i, x in enumerate(row)] for b, row in enumerate(xs)]
    assert torch.allclose(whiten(t(junk), mask=torch.tensor(mask)), out)


def test_policy_loss_hand_computed():
    # ratios [1.5, 1.5, 1.1, 0.5], A [2, -1, 1, -1], eps 0.2
    # unclipped -A*r = [-3.0, 1.5, -1.1, 0.5]; clipped -A*clip(r) = [-2.4, 1.2, -1.1, 0.8]
    # max = [-2.4, 1.5, -1.1, 0.8]: clipping active on tokens 0 and 3 -> clipfrac 0.5
    ratios = [1.5, 1.5, 1.1, 0.5]
    old = t([-1.0, -2.0, -0.5, -3.0])
    logp = old + t([math.log(r) for r in ratios])
    adv = t([2.0, -1.0, 1.0, -1.0])
    loss, st = policy_loss(logp, old, adv, 0.2)
    assert loss.item() == pytest.approx((-2.4 + 1.5 - 1.1 + 0.8) / 4, abs=1e-12)
    assert st["clipfrac"].item() == pytest.approx(0.5)
    assert st["ratio"].item() == pytest.approx(sum(ratios) / 4, abs=1e-12)
    assert st["approxkl"].item() == pytest.approx(0.5 * sum(math.log(r) ** 2 for r in ratios) / 4, abs=1e-12)
    assert st["policykl"].item() == pytest.approx(-sum(math.log(r) for r in ratios) / 4, abs=1e-12)
    mask = torch.tensor([1, 1, 1, 0])
    loss_m, st_m = policy_loss(logp, old, adv, 0.2, mask)
    assert loss_m.item() == pytest.approx((-2.4 + 1.5 - 1.1) / 3, abs=1e-12)
    assert st_m["clipfrac"].item() == pytest.approx(1 / 3)


def test_policy_loss_inside_clip_range_is_unclipped():
    old = t([-1.0, -1.0])
    logp = old + t([math.log(1.1), math.log(0.9)])
    loss, st = policy_loss(logp, old, t([1.0, 3.0]), 0.2)
    assert loss.item() == pytest.approx((-1.1 - 2.7) / 2, abs=1e-12)
    assert st["clipfrac"].item() == 0.0


def test_value_loss_hand_computed():
    # old V = 0, eps_v = 0.2 -> clipped vpred in [-0.2, 0.2]
    # vpred 0.5, R 1: (0.5-1)^2=0.25, (0.2-1)^2=0.64 -> 0.64 (clip active)
    # vpred 0.5, R 0: 0.25, (0.2)^2=0.04            -> 0.25
    # vpred 0.1, R 1: 0.81 both (inside the range)   -> 0.81
    vpred, old, ret = t([0.5, 0.5, 0.1]), t([0.0, 0.0, 0.0]), t([1.0, 0.0, 1.0])
    loss, st = value_loss(vpred, old, ret, 0.2)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.25 + 0.81) / 3, abs=1e-12)
    assert st["clipfrac"].item() == pytest.approx(1 / 3)
    assert st["error"].item() == pytest.approx((0.25 + 0.25 + 0.81) / 3, abs=1e-12)
    loss_m, st_m = value_loss(vpred, old, ret, 0.2, torch.tensor([0, 1, 1]))
    assert loss_m.item() == pytest.approx(0.5 * (0.25 + 0.81) / 2, abs=1e-12)
    assert st_m["clipfrac"].item() == 0.0


LOGP = [-0.5, -2.0, -1.2, -3.0]
REF = [-1.0, -1.5, -1.2, -0.1]


@pytest.mark.parametrize(
    "estimator,fn",
    [
        ("kl", lambda lp, rf: lp - rf),
        ("abs", lambda lp, rf: abs(lp - rf)),
        ("mse", lambda lp, rf: 0.5 * (lp - rf) ** 2),
        ("k3", lambda lp, rf: (math.exp(rf - lp) - 1) - (rf - lp)),
    ],
)
def test_kl_penalty_token_estimators(estimator, fn):
    out = kl_penalty(t(LOGP), t(REF), estimator).tolist()
    assert out == pytest.approx([fn(lp, rf) for lp, rf in zip(LOGP, REF)], rel=1e-12, abs=1e-12)


def test_kl_penalty_k3_non_negative():
    rng = random.Random(5)
    lp = t([rng.uniform(-8, 0) for _ in range(200)])
    rf = t([rng.uniform(-8, 0) for _ in range(200)])
    assert (kl_penalty(lp, rf, "k3") >= 0).all()
    assert kl_penalty(lp, lp, "k3").abs().max().item() == 0.0


def test_kl_penalty_full_matches_plain_math():
    logits = [[1.0, 0.0, -1.0], [0.3, 2.0, 0.1]]
    ref_logits = [[0.0, 0.5, 0.2], [0.3, 2.0, 0.1]]
    out = kl_penalty(t([0.0, 0.0]), t([0.0, 0.0]), "full", logits=t(logits), ref_logits=t(ref_logits))
    for row, ref_row, got in zip(logits, ref_logits, out.tolist()):
        zp, zq = sum(math.exp(x) for x in row), sum(math.exp(x) for x in ref_row)
        p = [math.exp(x) / zp for x in row]
        q = [math.exp(x) / zq for x in ref_row]
        assert got == pytest.approx(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q)), abs=1e-6)
    assert out[0].item() > 0.01 and abs(out[1].item()) < 1e-6


def test_kl_penalty_errors():
    with pytest.raises(ValueError, match="unknown kl estimator"):
        kl_penalty(t([0.0]), t([0.0]), "k2")
    with pytest.raises(ValueError):
        kl_penalty(t([0.0]), t([0.0]), "full")


def test_per_token_rewards_zero_kl():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    scores = t([2.0, -1.0, 0.5])
    rewards, non_score = per_token_rewards(scores, torch.zeros(3, 4, dtype=F64), 0.2, mask)
    expected = [[0, 0, 2.0, 0], [-1.0, 0, 0, 0], [0, 0, 0, 0.5]]
    assert rewards.tolist() == expected
    assert non_score.tolist() == [[0.0] * 4] * 3


def test_per_token_rewards_with_kl_and_mask():
    kl = [[0.5, -1.0, 2.0, 9.0], [3.0, 9.0, 9.0, 9.0]]
    mask = [[1, 1, 1, 0], [1, 0, 0, 0]]
    scores, beta = [1.5, -0.7], 0.1
    rewards, non_score = per_token_rewards(t(scores), t(kl), beta, torch.tensor(mask))
    for b in range(2):
        last = sum(mask[b]) - 1
        for i in range(4):
            ns = -beta * kl[b][i] if mask[b][i] else 0.0
            assert non_score[b, i].item() == pytest.approx(ns, abs=1e-12)
            assert rewards[b, i].item() == pytest.approx(ns + (scores[b] if i == last else 0.0), abs=1e-12)


def test_logprobs_and_entropy_match_plain_math():
    rng = random.Random(9)
    logits = [[[rng.uniform(-3, 3) for _ in range(5)] for _ in range(3)] for _ in range(2)]
    labels = [[rng.randrange(5) for _ in range(3)] for _ in range(2)]
    lp = logprobs_from_logits(t(logits), torch.tensor(labels))
    ent = entropy_from_logits(t(logits))
    assert lp.shape == (2, 3) and ent.shape == (2, 3)
    for b in range(2):
        for i in range(3):
            row = logits[b][i]
            z = sum(math.exp(x) for x in row)
            p = [math.exp(x) / z for x in row]
            assert lp[b, i].item() == pytest.approx(math.log(p[labels[b][i]]), abs=1e-5)
            assert ent[b, i].item() == pytest.approx(-sum(pi * math.log(pi) for pi in p), abs=1e-5)


def test_fused_logprobs_and_entropy_match_the_separate_functions_and_their_gradient():
    from minichatgpt.core import logprobs_and_entropy

    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(7, 11, generator=gen) * 4).requires_grad_(True)
    labels = torch.randint(0, 11, (7,), generator=gen)
    weights = torch.randn(7, generator=gen)  # an arbitrary upstream gradient per token
    lp, ent = logprobs_and_entropy(logits, labels)
    assert not ent.requires_grad  # a statistic: no graph through the entropy
    (grad,) = torch.autograd.grad((lp * weights).sum(), logits)
    ref_lp = logprobs_from_logits(logits, labels)
    (ref_grad,) = torch.autograd.grad((ref_lp * weights).sum(), logits)
    assert torch.allclose(lp, ref_lp, atol=1e-6)
    assert torch.allclose(ent, entropy_from_logits(logits.detach()), atol=1e-5)
    assert torch.allclose(grad, ref_grad, atol=1e-6)
    # hand check of one row: d logp_y / d logit_j = [j == y] - softmax_j
    p0 = torch.softmax(logits[0].detach(), -1)
    expected = -p0 * weights[0]
    expected[labels[0]] += weights[0]
    assert torch.allclose(grad[0], expected, atol=1e-6)


def test_adaptive_kl_controller():
    # e = clip(KL/6 - 1, -0.2, 0.2); beta *= 1 + e * 256 / 10000
    ctl = AdaptiveKLController(0.2, 6.0, 10000.0)
    assert ctl.update(12.0, 256) == pytest.approx(0.2 * (1 + 0.2 * 0.0256))  # error 1.0 clipped to 0.2
    ctl = AdaptiveKLController(0.2, 6.0, 10000.0)
    assert ctl.update(6.6, 256) == pytest.approx(0.2 * (1 + 0.1 * 0.0256))  # error 0.1, unclipped
    ctl = AdaptiveKLController(0.2, 6.0, 10000.0)
    assert ctl.update(5.4, 256) == pytest.approx(0.2 * (1 - 0.1 * 0.0256))
    ctl = AdaptiveKLController(0.2, 6.0, 10000.0)
    assert ctl.update(0.0, 256) == pytest.approx(0.2 * (1 - 0.2 * 0.0256))  # error -1.0 clipped to -0.2
    assert ctl.value == pytest.approx(0.2 * 0.99488)
    ctl = AdaptiveKLController(0.2, 6.0, 10000.0)
    assert ctl.update(6.0, 256) == pytest.approx(0.2)
    ctl.update(12.0, 100)
    ctl.update(12.0, 100)
    assert ctl.value == pytest.approx(0.2 * 1.002**2)


def test_fixed_kl_controller():
    ctl = FixedKLController(0.3)
    assert ctl.update(100.0, 256) == 0.3
    assert ctl.update(0.0, 256) == 0.3
    assert ctl.value == 0.3


PPO_KEYS = {
    "loss/policy", "loss/value", "loss/total", "policy/entropy", "policy/approxkl", "policy/policykl",
    "policy/clipfrac", "policy/advantages", "policy/advantages_mean", "policy/ratio", "returns/mean",
    "returns/var", "val/vpred", "val/error", "val/clipfrac", "val/mean", "val/var",
}


def test_ppo_loss_stats_keys_and_ratio_one():
    from minichatgpt.ppo.update import ppo_loss

    params = PPOParams()
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(2, 4, generator=gen)
    values = torch.randn(2, 4, generator=gen)
    vpreds = values + 0.5 * torch.randn(2, 4, generator=gen)
    adv = torch.randn(2, 4, generator=gen)
    ret = torch.randn(2, 4, generator=gen)
    logits = torch.randn(2, 4, 6, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    loss_p, loss_v, stats = ppo_loss(logp.clone(), values, logits, vpreds, logp, mask, adv, ret, params)
    assert set(stats) == PPO_KEYS
    assert stats["policy/ratio"].shape == (5,)
    assert torch.allclose(stats["policy/ratio"], torch.ones(5))
    assert stats["policy/clipfrac"].item() == 0.0
    assert stats["policy/approxkl"].item() == 0.0
    exp_pg = -sum(adv[b, i].item() for b in range(2) for i in range(4) if mask[b, i]) / 5
    assert loss_p.item() == pytest.approx(exp_pg, abs=1e-5)
    assert stats["loss/total"].item() == pytest.approx(
        stats["loss/policy"].item() + params.vf_coef * stats["loss/value"].item(), abs=1e-6
    )
    assert loss_v.item() == pytest.approx(params.vf_coef * stats["loss/value"].item(), abs=1e-7)
    assert stats["policy/advantages"].tolist() == adv[mask.bool()].tolist()
    assert torch.isfinite(stats["policy/entropy"])


def test_every_declared_kl_estimator_is_implemented():
    """params.yaml accepts exactly the estimators core.kl_penalty implements (core imports no params)."""
    from minichatgpt.params import KL_ESTIMATORS

    logits = torch.tensor([[[0.1, 0.2, 0.3]]])
    for estimator in KL_ESTIMATORS:
        kl_penalty(t([[-1.0]]), t([[-1.2]]), estimator, logits=logits, ref_logits=logits + 0.1)
    with pytest.raises(ValueError, match="expected kl, abs, mse, full or k3"):
        kl_penalty(t([0.0]), t([0.0]), "k2")
    assert set(KL_ESTIMATORS) == {"kl", "abs", "mse", "full", "k3"}
