"""Supervised training of the embedded default models (policy LM and reward classifier).

Batches are drawn on the CPU with seeded generators and moved to the model's device, so the
data order is the same on every device; forward passes run under ``placement``'s autocast.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from minichatgpt.models.tokenizer import pad_ids, unpadded_rows
from minichatgpt.params import PretrainParams, RewardParams
from minichatgpt.runtime.device import CPU, Placement, device_of

log = logging.getLogger(__name__)


def _lr_at(step: int, max_steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def _train_steps(model: torch.nn.Module, max_steps: int, lr: float, desc: str, loss_at,
                 placement: Placement = CPU) -> None:
    """AdamW with linear warm-up and cosine decay for a fixed number of steps."""
    # fused: ATen's kernel (pinned by ATEN_CPU_CAPABILITY); the for-each path takes sqrt from MKL VML,
    # whose result depends on the CPU even with MKL_CBWR pinned (benchmarks/portability_probe.py)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, fused=True)
    warmup = max(1, max_steps // 20)
    model.train()
    bar = tqdm(range(max_steps), desc=desc, mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, max_steps, lr, warmup)
        with placement.autocast():
            loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def token_stream(tokenizer: Any, texts: list[str]) -> np.ndarray:
    """All texts tokenized and joined with EOS, as one int32 array."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    flat = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int32)
    return flat


def pretrain_lm(model: torch.nn.Module, stream: np.ndarray, valid: np.ndarray, params: PretrainParams,
                placement: Placement = CPU) -> dict:
    """Train a causal LM (on ``placement.device``) on random ``block_size`` windows of ``stream``; return metrics."""
    gen = torch.Generator().manual_seed(params.seed)
    data = torch.from_numpy(stream.astype(np.int64))
    block = params.block_size
    # the loss transformers falls back to for a GPT-2 LM, named so that it does not warn (not saved)
    model.loss_type = "ForCausalLM"

    def loss_at(step: int) -> torch.Tensor:
        starts = torch.randint(0, len(data) - block - 1, (params.batch_size,), generator=gen, device=gen.device)
        batch = torch.stack([data[s : s + block] for s in starts.tolist()]).to(placement.device)
        return model(input_ids=batch, labels=batch).loss

    with unpadded_rows():  # windows of the stream: EOS separates texts, nothing is padding
        _train_steps(model, params.max_steps, params.learning_rate, "pretrain", loss_at, placement)
        with placement.autocast():
            valid_loss = lm_loss(model, valid, block)
    return {"pretrain/valid_loss": valid_loss, "pretrain/valid_perplexity": math.exp(valid_loss),
            "pretrain/steps": params.max_steps}


@torch.no_grad()
def lm_loss(model: torch.nn.Module, stream: np.ndarray, block: int, max_blocks: int = 256) -> float:
    n = min(max_blocks, (len(stream) - 1) // block)
    if n < 1:
        raise ValueError(f"validation text has {len(stream)} tokens; need more than block_size={block}")
    data = torch.from_numpy(stream[: n * block].astype(np.int64)).view(n, block).to(device_of(model))
    losses = [model(input_ids=chunk, labels=chunk).loss.item() for chunk in data.split(32)]
    return float(np.mean(losses))


def classifier_examples(
    tokenizer: Any, texts: list[str], labels: list[int], max_length: int, seed: int, prefix_share: float = 0.5
) -> tuple[list[list[int]], list[int]]:
    """Tokenized examples; a share is cut to a random 8..max_length prefix so short texts score sensibly."""
    rng = np.random.default_rng(seed)
    ids = tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]
    cls_id = tokenizer.cls_token_id
    sep = [tokenizer.sep_token_id] if tokenizer.sep_token_id is not None else []  # pretrained BERT-style encoders
    out = []
    for doc in ids:
        limit = max_length - 1
        if rng.random() < prefix_share:
            limit = int(rng.integers(8, max_length))
        out.append([cls_id, *doc[: max(1, limit - 1 - len(sep))], *sep] if cls_id is not None else doc[:limit])
    return out, list(labels)


def train_classifier(
    model: torch.nn.Module, examples: list[list[int]], labels: list[int], pad_id: int, params: RewardParams,
    placement: Placement = CPU,
) -> None:
    gen = torch.Generator().manual_seed(params.seed)
    torch.manual_seed(params.seed)  # dropout
    y = torch.tensor(labels, dtype=torch.long, device=gen.device)

    def loss_at(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(examples), (params.batch_size,), generator=gen, device=gen.device).tolist()
        ids, mask = (x.to(placement.device) for x in pad_ids([examples[i] for i in idx], pad_id))
        return model(input_ids=ids, attention_mask=mask, labels=y[idx].to(placement.device)).loss

    _train_steps(model, params.max_steps, params.learning_rate, "train_reward", loss_at, placement)


@torch.no_grad()
def classifier_accuracy(model: torch.nn.Module, examples: list[list[int]], labels: list[int], pad_id: int) -> float:
    correct = 0
    device = device_of(model)
    for start in range(0, len(examples), 128):
        ids, mask = (x.to(device) for x in pad_ids(examples[start : start + 128], pad_id))
        pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1).cpu()
        correct += int((pred == torch.tensor(labels[start : start + 128], device=pred.device)).sum())
    return correct / max(1, len(examples))
