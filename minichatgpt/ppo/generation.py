"""Batched generation and forward passes over (query, response) pairs.

Generation captures each sampled token's log-probability and the value estimate
from the same forward step, so rollouts need no second policy pass. Queries are
left-padded with position ids from the attention mask; scoring passes put each
query+response at position 0 and right-pad, so both layouts see the same
positions and padding never leaks into the numbers.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from minichatgpt.core import logprobs_and_entropy, logprobs_from_logits
from minichatgpt.models.policy import PolicyWithValueHead
from minichatgpt.models.tokenizer import pad_ids, pad_rows, unpadded_rows
from minichatgpt.runtime.device import device_of, to_device


@dataclass
class Generated:
    response_ids: list[list[int]]
    logprobs: list[list[float]]
    values: list[list[float]]


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@functools.cache
def _accepts_logits_to_keep(cls: type) -> bool:
    """transformers >= 4.50 causal LMs project only the positions asked for (``logits_to_keep``)."""
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def _lm_of(model: torch.nn.Module) -> torch.nn.Module:
    return model.pretrained_model if isinstance(model, PolicyWithValueHead) else model


def sample_tokens(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row from (unnormalised) ``probs`` by inverting the CDF with one uniform per row.

    Several times cheaper than ``torch.multinomial`` over a large vocabulary on CPU; a
    token of probability 0 is never drawn (``u`` is scaled by the CDF's last entry).
    """
    cdf = probs.cumsum(-1)
    u = torch.rand((probs.shape[0], 1), generator=generator, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)[:, 0]


@torch.no_grad()
def generate(
    policy: PolicyWithValueHead,
    queries: list[list[int]],
    lengths: list[int],
    eos_id: int,
    pad_id: int,
    generator: torch.Generator,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Generated:
    """Sample ``lengths[i]`` tokens after each query (stopping early at EOS, kept).

    Log-probabilities are those of the unfiltered policy distribution, which is
    what the PPO ratio compares against. Runs on the policy's device; ``generator`` must be there too.
    """
    if len(queries) != len(lengths):
        raise ValueError(f"{len(queries)} queries but {len(lengths)} lengths")
    device = device_of(policy)
    ids, mask = (x.to(device) for x in pad_ids(queries, pad_id, left=True))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    steps = max(lengths)
    keep = 1 if _accepts_logits_to_keep(type(policy.pretrained_model)) else 0
    logits, values, cache = policy(ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                   logits_to_keep=keep)
    n = len(queries)
    tok = torch.full((n, steps), pad_id, dtype=torch.long, device=device)
    lp = torch.zeros((n, steps), device=device)
    vl = torch.zeros((n, steps), device=device)
    active = torch.arange(n, device=device)  # rows still generating; finished rows leave the batch (and the KV cache)
    todo = torch.tensor(lengths, device=device)
    can_shrink = hasattr(cache, "batch_select_indices")
    for step in range(steps):
        last = logits[:, -1, :].float()
        probs = torch.softmax(last, dim=-1)  # one pass; a drawn token's probability is never 0
        if top_k or top_p < 1.0:
            token = sample_tokens(torch.softmax(_filter_logits(last, top_k, top_p), dim=-1), generator)
        else:
            token = sample_tokens(probs, generator)
        tok[active, step] = token
        lp[active, step] = probs.gather(-1, token[:, None])[:, 0].log()
        vl[active, step] = values[:, -1].float()
        going = (todo[active] > step + 1) & (token != eos_id)
        if not bool(going.any()):
            break
        if can_shrink and not bool(going.all()):
            idx = going.nonzero()[:, 0]
            cache.batch_select_indices(idx)
            active, token, mask, positions = active[idx], token[idx], mask[idx], positions[idx]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        logits, values, cache = policy(token[:, None], attention_mask=mask, position_ids=positions, cache=cache,
                                       use_cache=True)
    tok, lp, vl = tok.tolist(), lp.tolist(), vl.tolist()
    out = Generated([], [], [])
    for i, n in enumerate(lengths):
        row = tok[i][:n]
        if eos_id in row:
            n = row.index(eos_id) + 1
        out.response_ids.append(tok[i][:n])
        out.logprobs.append(lp[i][:n])
        out.values.append(vl[i][:n])
    return out


CPU = torch.device("cpu")
"""where batch layouts (padding, packing, gather indices) are worked out; models get them on their device"""


def pack(queries: list[list[int]], responses: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``query+response`` batch plus the gather index of each response token (on the CPU)."""
    ids, real = pad_rows([q + r for q, r in zip(queries, responses)], pad_id, torch.long)
    width = ids.shape[1]
    resp_width = max(len(r) for r in responses)
    qlen = torch.tensor([len(q) for q in queries], device=CPU)
    rlen = torch.tensor([len(r) for r in responses], device=CPU)
    offsets = torch.arange(resp_width, device=CPU)
    # logits at position p predict token p+1: response token k sits at qlen+k
    index = (qlen[:, None] - 1 + offsets[None, :]).clamp(max=width - 2)
    response_mask = (offsets[None, :] < rlen[:, None]).float()
    return {"input_ids": ids, "attention_mask": real.long(), "index": index, "response_mask": response_mask}


def _bins(lengths: list[int]) -> list[list[int]]:
    """First-fit decreasing into rows of twice the longest sequence: about a quarter fewer tokens
    than padding, at most twice the attention span (measured fastest of 1x, 2x, 3x, all-in-one)."""
    capacity = 2 * max(lengths)
    groups: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for g, free in enumerate(room):
            if lengths[i] <= free:
                groups[g].append(i)
                room[g] -= lengths[i]
                break
        else:
            groups.append([i])
            room.append(capacity - lengths[i])
    return groups


def packed(batch: dict[str, torch.Tensor], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """The right-padded ``pack`` batch with several sequences per row and no padding between them.

    Position ids restart at 0 for each sequence; transformers then masks attention block-diagonally
    (its packed-sequence format), so every sequence sees exactly what it saw padded, and the
    transformer body runs on about a quarter fewer tokens. ``start`` is each sequence's flat offset.
    """
    real = batch["attention_mask"].bool()
    lengths = real.sum(-1).tolist()
    groups = _bins(lengths)
    order = [i for g in groups for i in g]
    totals = [sum(lengths[i] for i in g) for g in groups]
    width = max(totals)
    start = [0] * len(lengths)
    for g, members in enumerate(groups):
        offset = g * width
        for i in members:
            start[i] = offset
            offset += lengths[i]
    slots = torch.arange(width, device=CPU)[None, :] < torch.tensor(totals, device=CPU)[:, None]  # row-major order
    placed = real[order]
    ids = torch.full((len(groups), width), pad_id, dtype=torch.long, device=CPU)
    ids[slots] = batch["input_ids"][order][placed]
    positions = torch.zeros((len(groups), width), dtype=torch.long, device=CPU)
    positions[slots] = torch.arange(real.shape[1], device=CPU).expand(len(order), -1)[placed]
    return {"input_ids": ids, "position_ids": positions, "start": torch.tensor(start, device=CPU)}


def _packing_ok(model: torch.nn.Module) -> bool:
    """Whether ``model`` honours packed sequences (position ids, no attention mask); checked once per
    class on a two-sequence example against the padded layout, so other models keep the padded path."""
    lm = _lm_of(model)
    key = type(lm)
    if key not in _PACKING_OK:
        if not _accepts_logits_to_keep(key):
            _PACKING_OK[key] = False
            return False
        vocab = getattr(lm.config, "vocab_size", 11) or 11
        batch = pack([[1 % vocab, 2 % vocab, 3 % vocab], [4 % vocab]], [[5 % vocab, 6 % vocab], [7 % vocab] * 4], 0)
        tight = packed(batch)
        training = lm.training
        lm.eval()  # no dropout: the two layouts must give the same numbers
        device = device_of(lm)
        on = to_device(batch, device) | {"packed": to_device(tight, device)}
        with torch.no_grad(), unpadded_rows(), torch.autocast(device.type, enabled=False):  # compared in float32
            padded = lm(input_ids=on["input_ids"], attention_mask=on["attention_mask"]).logits.cpu()
            flat = lm(input_ids=on["packed"]["input_ids"], position_ids=on["packed"]["position_ids"],
                      use_cache=False).logits.cpu()
        lm.train(training)
        real = batch["attention_mask"].bool()
        flat = flat.reshape(-1, flat.shape[-1])
        where = tight["start"][:, None] + torch.arange(real.shape[1])[None, :]
        _PACKING_OK[key] = bool(torch.allclose(padded[real], flat[where[real]], atol=1e-4, rtol=1e-4))
    return _PACKING_OK[key]


_PACKING_OK: dict[type, bool] = {}


def _run(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(model, PolicyWithValueHead):
        logits, values, _ = model(ids, **kwargs)
        return logits, values
    return model(input_ids=ids, use_cache=False, **kwargs).logits, None


def _packed_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], real: torch.Tensor) -> tuple:
    """Response logits in flat-position order, their targets, ``(B, R)`` values, and the
    permutation that takes flat-position order back to row-major order of ``real``."""
    tight = packed(batch)  # the layout is worked out on the CPU; the model's inputs go to its device
    ids = tight["input_ids"]
    where = torch.where(real, tight["start"][:, None] + batch["index"], 0)  # flat position of each logit
    flat_pos, order = where[real].sort()
    keep = torch.zeros(ids.numel(), dtype=torch.bool, device=CPU)
    keep[flat_pos] = True
    device = device_of(model)
    with unpadded_rows():
        logits, values = _run(model, ids.to(device), position_ids=tight["position_ids"].to(device),
                              logits_to_keep=keep.view_as(ids).to(device))
    targets = ids.reshape(-1)[flat_pos + 1].to(device)
    values = None if values is None else values.reshape(-1)[where.to(device)]
    return logits, targets, values, order.argsort().to(device)


def _padded_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], real: torch.Tensor) -> tuple:
    device = device_of(model)
    ids, index, real = batch["input_ids"].to(device), batch["index"].to(device), real.to(device)
    kwargs: dict = {"attention_mask": batch["attention_mask"].to(device)}
    if _accepts_logits_to_keep(type(_lm_of(model))):
        rows = torch.arange(ids.shape[0], device=device)[:, None].expand_as(index)
        keep = torch.zeros_like(ids, dtype=torch.bool)
        keep[rows[real], index[real]] = True  # row-major order of `keep` == row-major order of `real`
        kwargs["logits_to_keep"] = keep
    logits, values = _run(model, ids, **kwargs)
    if "logits_to_keep" not in kwargs:
        logits = torch.gather(logits, 1, index[:, :, None].expand(-1, -1, logits.shape[-1]))[real]
    targets = torch.gather(ids, 1, index + 1)[real]
    return logits, targets, None if values is None else torch.gather(values, 1, index), None


def forward_responses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], with_values: bool = True, with_logits: bool = False,
    with_entropy: bool = False,
) -> dict[str, torch.Tensor]:
    """Per response token: logprobs, values (policy only), entropy and logits if asked; ``(B, R)``.

    The vocabulary projection, log-softmax and entropy run only on real response tokens
    (no query positions, no padding), which is most of the work of a small policy, and
    models that support it run on :func:`packed` rows. ``with_logits`` adds the response
    logits ``(B, R, V)`` and the entropy.
    """
    real = batch["response_mask"].bool()  # layouts are computed on the CPU, results are on the model's device
    forward = _packed_forward if _packing_ok(model) else _padded_forward
    flat, targets, values, back = forward(model, batch, real)
    flat = flat.float()  # bfloat16 autocast: log-softmax, entropy and losses in float32
    values = None if values is None else values.float()
    real = real.to(flat.device)
    if with_entropy or with_logits or torch.is_grad_enabled():
        logp, entropy = logprobs_and_entropy(flat, targets)
    else:  # scoring passes: one fused log-softmax (under half the time of logsumexp here), no entropy
        logp = logprobs_from_logits(flat, targets)
    if back is not None:  # per-token results back to row-major order
        logp = logp[back]
        flat = flat[back] if with_logits else flat
    out = {"logprobs": _unflatten(logp, real), "mask": batch["response_mask"].to(flat.device)}
    if with_values and values is not None:
        out["values"] = values
    if with_logits or with_entropy:
        out["entropy"] = _unflatten(entropy if back is None else entropy[back], real)
    if with_logits:
        padded = flat.new_zeros((*real.shape, flat.shape[-1]))
        padded[real] = flat
        out["logits"] = padded
    return out


def _unflatten(flat: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``(N,)`` values of the real tokens back to ``(B, R)`` with zeros at padding (keeps the graph)."""
    out = flat.new_zeros(real.shape)
    out[real] = flat
    return out
