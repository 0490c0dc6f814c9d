"""Held-out comparison of the policy before and after PPO on the same prompts and seed."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from minichatgpt.params import GenerationParams
from minichatgpt.runtime.device import CPU, Placement


def evaluate(
    before_dir: Path, after_dir: Path, reward_ref: str, prompts: pa.Table, gen: GenerationParams,
    seed: int, n_samples: int, placement: Placement = CPU,
) -> tuple[dict, list[dict], dict[str, np.ndarray]]:
    """Return ``(summary, samples, scores)``; KL is the mean over prompts of the summed k1 KL to the
    reference, ``scores`` the per-prompt rewards ``before`` and ``after``. Models run on ``placement``."""
    from minichatgpt.models.policy import load_policy
    from minichatgpt.models.reward import RewardModel
    from minichatgpt.ppo.steps import reference_logprobs, rollout

    reward = RewardModel(reward_ref, batch_size=gen.forward_batch_size, device=placement.device)
    results = {}
    reference = None
    with placement.autocast():
        for name, ckpt in (("before", before_dir), ("after", after_dir)):
            policy, tokenizer, _ = load_policy(ckpt, seed)
            table = rollout(policy.to(placement.device), tokenizer, prompts, gen, seed)
            texts = [q + r for q, r in zip(table["query"].to_pylist(), table["response"].to_pylist())]
            results[name] = (table, reward.score(texts).astype(np.float64))
            if name == "before":
                reference = policy.pretrained_model
        after, after_scores = results["after"]
        before, before_scores = results["before"]
        ref = reference_logprobs(reference, after["query_ids"].to_pylist(), after["response_ids"].to_pylist(),
                                 tokenizer.pad_token_id, gen.forward_batch_size)
    kl = np.asarray([sum(a) - sum(b) for a, b in zip(after["logprobs"].to_pylist(), ref)])
    n = len(after_scores)
    summary = {
        "reward_before": float(before_scores.mean()),
        "reward_before_stderr": float(before_scores.std(ddof=1) / math.sqrt(n)),
        "reward_after": float(after_scores.mean()),
        "reward_stderr": float(after_scores.std(ddof=1) / math.sqrt(n)),
        "reward_gain": float(after_scores.mean() - before_scores.mean()),
        "kl": float(kl.mean()),
        "kl_stderr": float(kl.std(ddof=1) / math.sqrt(n)),
        "n_prompts": n,
    } | placement.metrics()
    samples = [
        {"query": q, "response_before": rb, "response_after": ra, "score_before": round(float(sb), 4),
         "score_after": round(float(sa), 4)}
        for q, rb, ra, sb, sa in zip(
            after["query"].to_pylist()[:n_samples], before["response"].to_pylist()[:n_samples],
            after["response"].to_pylist()[:n_samples], before_scores[:n_samples], after_scores[:n_samples],
        )
    ]
    return summary, samples, {"before": before_scores, "after": after_scores}
