"""Pure tensor functions for PPO, following TRL's legacy conventions.

Nothing here does I/O or touches global state: every function maps tensors to
tensors, so the DVC stages and the notebook API share one implementation and the
math can be tested against plain-Python references.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class NonFiniteError(FloatingPointError):
    """A value, loss or input became NaN/inf; raised before any output is written."""


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (all positions without a mask)."""
    if mask is None:
        return x.mean() if dim is None else x.mean(dim)
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor | None = None, unbiased: bool = True) -> torch.Tensor:
    """Variance over masked positions; unbiased (Bessel-corrected) as TRL does."""
    if mask is None:
        return x.var(unbiased=unbiased)
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n <= 1:
            raise ValueError("unbiased variance needs at least two unmasked values")
        var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, shift_mean: bool = True, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Normalise to zero mean and unit variance: ``(x - mean) / sqrt(var + 1e-8)``.

    With ``shift_mean=False`` the mean is added back (only the scale changes), as
    TRL does for rewards. With a mask, statistics use unmasked positions only and
    masked positions are returned as 0.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    if mask is not None:
        out = out * mask.to(out.dtype)
    return out


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    gamma: float,
    lam: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the last dimension.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V`` after the last (unmasked)
    token taken as 0, ``A_t = delta_t + gamma * lam * A_{t+1}``. Returns the
    UNwhitened advantages and ``returns = advantages + values``. Accepts ``(T,)``
    or ``(B, T)``; positions where ``mask`` is 0 are treated as beyond the end of
    the episode (right padding) and get advantage 0.
    """
    squeeze = rewards.dim() == 1
    if squeeze:
        rewards, values = rewards.unsqueeze(0), values.unsqueeze(0)
        mask = None if mask is None else mask.unsqueeze(0)
    if rewards.shape != values.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and values {tuple(values.shape)} differ in shape")
    if mask is None:
        mask = torch.ones_like(rewards)
    mask = mask.to(rewards.dtype)
    rewards, values = rewards * mask, values * mask
    length = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    returns = advantages + values
    if squeeze:
        return advantages[0], returns[0]
    return advantages, returns


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label under ``logits`` (``[..., V]`` -> ``[...]``)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, -1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution given by ``logits`` (per position)."""
    logits = logits.float()
    pd = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (pd * logits).sum(dim=-1)


class _LabelLogprobs(torch.autograd.Function):
    """Label log-probability and entropy from one softmax pass (see :func:`logprobs_and_entropy`)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top = logits.amax(-1, keepdim=True)
        probs = (logits - top).exp_()
        total = probs.sum(-1, keepdim=True)
        lse = (top + total.log()).squeeze(-1)
        probs.div_(total)
        logp = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse
        entropy = lse - (probs * logits).sum(-1)
        ctx.save_for_backward(probs, labels)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor, _grad_entropy: torch.Tensor) -> tuple[torch.Tensor, None]:
        probs, labels = ctx.saved_tensors
        grad = probs * -grad_logp.unsqueeze(-1)  # d logp_y / d logits = onehot(y) - softmax
        grad.scatter_add_(-1, labels.unsqueeze(-1), grad_logp.unsqueeze(-1))
        return grad, None


def logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprobs_from_logits, entropy_from_logits)`` of ``[N, V]`` logits in one softmax pass.

    Over a large vocabulary the separate log-softmax, its backward and the entropy's
    softmax cost as much as the output projection on CPU; this reads the logits for one
    ``exp`` and keeps the softmax for the backward. Only the log-probabilities carry a
    gradient (the entropy is a statistic, as in TRL).
    """
    return _LabelLogprobs.apply(logits.float(), labels)


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str = "kl",
    logits: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token KL estimate between policy and reference (TRL's ``kl_penalty``).

    ``kl`` is the k1 estimator ``logp - ref_logp``; ``abs`` its absolute value;
    ``mse`` half its square (k2); ``k3`` is ``(r - 1) - log r`` with
    ``r = ref_p / p``, unbiased and never negative; ``full`` is the exact KL over
    the vocabulary and needs both logits.
    """
    if estimator == "kl":
        return logprobs - ref_logprobs
    if estimator == "abs":
        return (logprobs - ref_logprobs).abs()
    if estimator == "mse":
        return 0.5 * (logprobs - ref_logprobs).square()
    if estimator == "k3":
        log_ratio = ref_logprobs - logprobs
        return torch.expm1(log_ratio) - log_ratio
    if estimator == "full":
        if logits is None or ref_logits is None:
            raise ValueError("kl estimator 'full' needs the policy and reference logits")
        logp = F.log_softmax(logits.float(), dim=-1)
        ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
        return (logp.exp() * (logp - ref_logp)).sum(-1)
    raise ValueError(f"unknown kl estimator {estimator!r}; expected kl, abs, mse, full or k3")


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r_t = -beta * kl_t`` plus the score at each row's last unmasked token.

    Returns ``(rewards, non_score_rewards)``; both are 0 on masked positions.
    """
    mask = mask.to(kl.dtype)
    non_score = -kl_coef * kl * mask
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)
    # add the score only where it belongs, so other positions keep -beta*kl exactly (-0.0 at kl=0, as TRL)
    rewards = torch.where(last, non_score + scores.to(kl.dtype).unsqueeze(-1), non_score)
    return rewards, non_score


def clip_by_value(x: torch.Tensor, low: torch.Tensor | float, high: torch.Tensor | float) -> torch.Tensor:
    high, low = (torch.as_tensor(v, dtype=x.dtype, device=x.device) for v in (high, low))
    return torch.max(torch.min(x, high), low)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    cliprange: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate ``mean(max(-A * rho, -A * clip(rho, 1-eps, 1+eps)))``."""
    ratio = torch.exp(logprobs - old_logprobs)
    losses = -advantages * ratio
    losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(losses, losses_clipped), mask)
    log_ratio = logprobs - old_logprobs
    stats = {
        "clipfrac": masked_mean(torch.gt(losses_clipped, losses).float(), mask),
        "approxkl": 0.5 * masked_mean(log_ratio.square(), mask),
        "policykl": masked_mean(old_logprobs - logprobs, mask),
        "ratio": masked_mean(ratio, mask),
    }
    return loss, stats


def value_loss(
    vpreds: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    cliprange_value: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ``0.5 * mean(max((V-R)^2, (clip(V, V_old +- eps_v) - R)^2))``."""
    vclipped = clip_by_value(vpreds, old_values - cliprange_value, old_values + cliprange_value)
    losses = (vpreds - returns).square()
    losses_clipped = (vclipped - returns).square()
    loss = 0.5 * masked_mean(torch.max(losses, losses_clipped), mask)
    stats = {
        "clipfrac": masked_mean(torch.gt(losses_clipped, losses).float(), mask),
        "error": masked_mean((vpreds - returns).square(), mask),
    }
    return loss, stats


@dataclass
class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019), as in TRL legacy.

    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + e * n_steps / horizon)``.
    """

    value: float
    target: float
    horizon: float

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


@dataclass
class FixedKLController:
    """Constant KL coefficient."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


def kl_controller(
    adaptive: bool, value: float, target: float, horizon: float
) -> AdaptiveKLController | FixedKLController:
    return AdaptiveKLController(value, target, horizon) if adaptive else FixedKLController(value)


@dataclass
class RunningMoments:
    """Running mean and variance of all scores seen so far (parallel-variance merge).

    ``std`` is the unbiased standard deviation; the state is plain floats so it can
    travel in a checkpoint's ``state.json``.
    """

    mean: float = 0.0
    var: float = 1.0
    count: float = 1e-24

    @property
    def std(self) -> float:
        return math.sqrt(self.var * self.count / max(self.count - 1, 1e-24)) if self.count > 1 else math.sqrt(self.var)

    def update(self, xs: torch.Tensor) -> RunningMoments:
        xs = xs.double().reshape(-1)
        n = xs.numel()
        xs_mean, xs_var = xs.mean().item(), xs.var(unbiased=False).item()
        total = self.count + n
        delta = xs_mean - self.mean
        m2 = self.var * self.count + xs_var * n + delta**2 * self.count * n / total
        return RunningMoments(mean=self.mean + delta * n / total, var=m2 / total, count=total)


def process_scores(
    scores: torch.Tensor, ends_with_eos: torch.Tensor, moments: RunningMoments, *,
    missing_eos_penalty: float = 0.0, use_score_scaling: bool = False, use_score_norm: bool = False,
    score_clip: float = 0.0,
) -> tuple[torch.Tensor, RunningMoments]:
    """Scores as PPO sees them: EOS penalty, running scaling/normalisation, clipping (TRL order).

    Returns the processed scores and the moments updated with this batch (after the
    penalty), which the next iteration continues from.
    """
    scores = scores.float()
    if missing_eos_penalty:
        scores = scores - missing_eos_penalty * (~ends_with_eos.bool()).float()
    if use_score_scaling:
        moments = moments.update(scores)
        factor = moments.std + torch.finfo(scores.dtype).eps
        scores = (scores - moments.mean) / factor if use_score_norm else scores / factor
    if score_clip:
        scores = scores.clamp(-score_clip, score_clip)
    return scores, moments
