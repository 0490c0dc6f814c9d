"""One PPO iteration as table transforms: rollout -> score -> advantages -> update.

Each function maps Arrow tables (the stage artifacts) and models to a new table
or statistics; the stage scripts only add file I/O around them, and the
notebook API calls the same functions.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from minichatgpt.core import NonFiniteError, RunningMoments, gae, kl_penalty, per_token_rewards, process_scores, whiten
from minichatgpt.models.tokenizer import pad_rows
from minichatgpt.params import GenerationParams, PPOParams
from minichatgpt.runtime.parallel import SINGLE, World

log = logging.getLogger(__name__)


def check_finite(name: str, rows: list[list[float]] | np.ndarray, where: str) -> None:
    """Stop with the sample and field named if any value is NaN or infinite."""
    for i, row in enumerate(rows):
        arr = np.asarray(row, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise NonFiniteError(f"{where}: non-finite {name} in sample {i}: {arr.tolist()}")


def pad_floats(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token values of a table column, right-padded with 0, and their float mask."""
    values, mask = pad_rows(rows, 0.0, torch.float32)
    return values, mask.float()


def unpad(x: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    lengths = mask.sum(-1).long().tolist()
    return [row[:n] for row, n in zip(x.tolist(), lengths)]


def sample_prompts(prompts: pa.Table, split: str, n: int | None, rng: np.random.Generator) -> pa.Table:
    """``n`` distinct prompts of ``split`` drawn with ``rng`` (all of them, in order, if n is None)."""
    mask = np.asarray(prompts["split"].to_pylist()) == split
    rows = np.flatnonzero(mask)
    if n is None:
        return prompts.take(rows)
    if len(rows) < n:
        raise ValueError(f"prompts: only {len(rows)} {split!r} prompts, but ppo.batch_size={n}")
    return prompts.take(np.sort(rng.choice(rows, size=n, replace=False)))


def encode_queries(tokenizer: Any, prompts: pa.Table) -> list[list[int]]:
    ids = tokenizer(prompts["text"].to_pylist(), add_special_tokens=False)["input_ids"]
    return [row[:n] for row, n in zip(ids, prompts["query_len"].to_pylist())]


def rollout(
    policy: Any, tokenizer: Any, prompts: pa.Table, gen: GenerationParams, seed: int, progress: bool = True,
    world: World = SINGLE,
) -> pa.Table | None:
    """Generate one response per prompt and record per-token logprobs and values.

    Each chunk of ``gen.forward_batch_size`` prompts samples with its own seeded
    generator (on the policy's device), so under ``accelerate launch`` the processes share the chunks and
    process 0 returns the same table a single process would (the others get None).
    """
    from tqdm.auto import tqdm

    from minichatgpt.ppo.generation import generate
    from minichatgpt.runtime.device import device_of
    from minichatgpt.runtime.parallel import chunk_seed

    rng = np.random.default_rng(seed)
    queries = encode_queries(tokenizer, prompts)
    if any(len(q) == 0 for q in queries):
        bad = next(i for i, q in enumerate(queries) if not q)
        raise ValueError(f"prompt {prompts['prompt_id'][bad].as_py()} encodes to no tokens")
    lengths = rng.integers(gen.output_min_length, gen.output_max_length + 1, size=len(queries)).tolist()
    context = getattr(policy.config, "n_positions", None) or getattr(policy.config, "max_position_embeddings", None)
    longest = max(len(q) for q in queries) + gen.output_max_length
    if context and longest > context:
        raise ValueError(f"prompt + response of {longest} tokens exceeds the policy context of {context}")
    pad = tokenizer.pad_token_id
    starts = list(range(0, len(queries), gen.forward_batch_size))
    mine = {}
    for chunk in tqdm(range(world.rank, len(starts), world.size), desc="generate", disable=not progress):
        start, end = starts[chunk], starts[chunk] + gen.forward_batch_size
        generator = torch.Generator(device=device_of(policy)).manual_seed(chunk_seed(seed, chunk))
        out = generate(policy, queries[start:end], lengths[start:end], tokenizer.eos_token_id, pad, generator,
                       gen.top_k, gen.top_p)
        mine[chunk] = (out.response_ids, out.logprobs, out.values)
    chunks = {k: v for part in world.gather(mine) for k, v in part.items()}
    if not world.is_main:
        return None
    responses, logprobs, values = [], [], []
    for chunk in range(len(starts)):
        responses += chunks[chunk][0]
        logprobs += chunks[chunk][1]
        values += chunks[chunk][2]
    check_finite("logprobs", logprobs, "rollout")
    check_finite("values", values, "rollout")
    return pa.table({
        "prompt_id": prompts["prompt_id"],
        "query_ids": pa.array(queries, pa.list_(pa.int32())),
        "response_ids": pa.array(responses, pa.list_(pa.int32())),
        "query": tokenizer.batch_decode(queries, skip_special_tokens=True),
        "response": tokenizer.batch_decode(responses, skip_special_tokens=True),
        "logprobs": pa.array(logprobs, pa.list_(pa.float32())),
        "values": pa.array(values, pa.list_(pa.float32())),
    })


@torch.no_grad()
def reference_logprobs(
    reference: Any, queries: list[list[int]], responses: list[list[int]], pad_id: int, batch_size: int
) -> list[list[float]]:
    from minichatgpt.ppo.generation import forward_responses, pack

    out: list[list[float]] = []
    for start in range(0, len(queries), batch_size):
        q, r = queries[start : start + batch_size], responses[start : start + batch_size]
        res = forward_responses(reference, pack(q, r, pad_id), with_values=False)
        out += unpad(res["logprobs"], res["mask"])
    return out


@torch.no_grad()
def full_kl(
    policy: Any, reference: Any, queries: list[list[int]], responses: list[list[int]], pad_id: int, batch_size: int
) -> list[list[float]]:
    """Exact per-token KL over the vocabulary (``ppo.kl_penalty: full``); needs both models' logits."""
    from minichatgpt.ppo.generation import forward_responses, pack

    out: list[list[float]] = []
    for start in range(0, len(queries), batch_size):
        batch = pack(queries[start : start + batch_size], responses[start : start + batch_size], pad_id)
        pol = forward_responses(policy, batch, with_values=False, with_logits=True)
        ref = forward_responses(reference, batch, with_values=False, with_logits=True)
        kl = kl_penalty(pol["logprobs"], ref["logprobs"], "full", pol["logits"], ref["logits"])
        out += unpad(kl, pol["mask"])
    return out


def ends_with_eos(table: pa.Table, eos_id: int) -> torch.Tensor:
    return torch.tensor([row[-1] == eos_id for row in table["response_ids"].to_pylist()])


def moments_of(state: dict) -> RunningMoments:
    return RunningMoments(**state["score_moments"]) if state.get("score_moments") else RunningMoments()


def processed_scores(
    table: pa.Table, raw: np.ndarray, state: dict, params: PPOParams, eos_id: int
) -> tuple[torch.Tensor, RunningMoments]:
    """The scores PPO optimises and the running score moments after this batch."""
    scores = torch.from_numpy(np.array(raw, np.float32))  # a copy: Arrow columns are read-only
    return process_scores(
        scores, ends_with_eos(table, eos_id), moments_of(state),
        missing_eos_penalty=params.missing_eos_penalty, use_score_scaling=params.use_score_scaling,
        use_score_norm=params.use_score_norm, score_clip=params.score_clip,
    )


def score(
    rollouts: pa.Table, scores: np.ndarray, ref_logprobs: list[list[float]], kl_coef: float, estimator: str,
    processed: torch.Tensor | None = None, kl_rows: list[list[float]] | None = None,
) -> pa.Table:
    """Add the raw reward-model score, reference logprobs, per-token KL and rewards.

    ``processed`` are the scores after EOS penalty/scaling/clipping (default: raw);
    ``kl_rows`` a precomputed per-token KL (needed for the ``full`` estimator).
    """
    check_finite("score", [scores], "score")
    check_finite("ref_logprobs", ref_logprobs, "score")
    logprobs, mask = pad_floats(rollouts["logprobs"].to_pylist())
    ref, _ = pad_floats(ref_logprobs)
    if kl_rows is not None:
        kl = pad_floats(kl_rows)[0] * mask
    elif estimator == "full":
        raise ValueError("ppo.kl_penalty='full' needs the per-token KL from both models' logits (kl_rows)")
    else:
        kl = kl_penalty(logprobs, ref, estimator) * mask
    final = processed if processed is not None else torch.from_numpy(np.asarray(scores, np.float32))
    rewards, _ = per_token_rewards(final, kl, kl_coef, mask)
    return rollouts.append_column("score", pa.array(np.asarray(scores, np.float32), pa.float32())) \
        .append_column("ref_logprobs", pa.array(ref_logprobs, pa.list_(pa.float32()))) \
        .append_column("kl", pa.array(unpad(kl, mask), pa.list_(pa.float32()))) \
        .append_column("rewards", pa.array(unpad(rewards, mask), pa.list_(pa.float32()))) \
        .append_column("kl_coef", pa.array([kl_coef] * rollouts.num_rows, pa.float32()))


def advantages(scored: pa.Table, gamma: float, lam: float, whiten_rewards: bool = False) -> pa.Table:
    """GAE over each response, then whiten the advantages over the whole batch."""
    check_finite("rewards", scored["rewards"].to_pylist(), "scored rollouts")
    check_finite("values", scored["values"].to_pylist(), "scored rollouts")
    rewards, mask = pad_floats(scored["rewards"].to_pylist())
    if whiten_rewards:
        rewards = whiten(rewards, shift_mean=False, mask=mask)
    values, _ = pad_floats(scored["values"].to_pylist())
    adv, returns = gae(rewards, values, gamma, lam, mask)
    adv = whiten(adv, shift_mean=True, mask=mask)
    check_finite("advantages", adv.numpy(), "advantages")
    return scored.append_column("advantages", pa.array(unpad(adv, mask), pa.list_(pa.float32()))) \
        .append_column("returns", pa.array(unpad(returns, mask), pa.list_(pa.float32())))


def batch_from_table(table: pa.Table):
    from minichatgpt.ppo.update import PPOBatch

    logprobs, mask = pad_floats(table["logprobs"].to_pylist())
    return PPOBatch(
        queries=table["query_ids"].to_pylist(), responses=table["response_ids"].to_pylist(),
        logprobs=logprobs, values=pad_floats(table["values"].to_pylist())[0],
        advantages=pad_floats(table["advantages"].to_pylist())[0], returns=pad_floats(table["returns"].to_pylist())[0],
        mask=mask,
    )


def batch_stats(table: pa.Table) -> dict[str, float]:
    """Reward and KL figures of a scored batch (TRL's ``env/`` and ``objective/`` keys)."""
    scores = np.asarray(table["score"].to_pylist(), dtype=np.float64)
    kl = np.asarray([sum(r) for r in table["kl"].to_pylist()], dtype=np.float64)
    lengths = np.asarray([len(r) for r in table["response_ids"].to_pylist()], dtype=np.float64)
    return {
        "env/reward_mean": float(scores.mean()),
        "env/reward_std": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
        "objective/kl": float(kl.mean()),
        "objective/kl_coef": float(table["kl_coef"][0].as_py()),
        "tokens/response_len_mean": float(lengths.mean()),
    }


def next_kl_coef(current: float, mean_kl: float, n_steps: int, params: PPOParams) -> float:
    from minichatgpt.core import kl_controller

    ctl = kl_controller(params.adap_kl_ctrl, current, params.target, params.horizon)
    value = ctl.update(mean_kl, n_steps)
    if not math.isfinite(value):
        raise NonFiniteError(f"KL coefficient became {value} (mean KL {mean_kl})")
    return value


def current_kl_coef(state: dict, params: PPOParams) -> float:
    """The coefficient an iteration uses: the previous update's, or ``init_kl_coef`` at the start."""
    value = state.get("kl_coef")
    return params.init_kl_coef if value is None else float(value)


STAGE_OFFSETS = {"rollout": 1, "score": 2, "update": 3, "evaluate": 4}


def stage_seed(base: int, stage: str, iteration: int = 0) -> int:
    """A distinct, stable seed per (params seed, stage, iteration)."""
    return (base * 1_000_003 + iteration * 101 + STAGE_OFFSETS.get(stage, 0)) % (2**63)
