"""Tokenizers (trained here or loaded) and token rows as padded model inputs."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from minichatgpt.models.sources import ModelError, pretrained_kwargs

EOS = "<|endoftext|>"


def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on ``texts``, wrapped as a transformers fast tokenizer.

    ``GPT2TokenizerFast(vocab_file=..., merges_file=...)`` silently yields an empty
    tokenizer in transformers 5, hence ``tokenizer_object``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, unk_token=EOS)


def load_tokenizer(ref: str | Path):
    from transformers import AutoTokenizer

    try:
        name, extra = pretrained_kwargs(ref)
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=False, **extra)
    except (OSError, ValueError) as err:
        raise ModelError(f"tokenizer {ref}: cannot be loaded: {err}") from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ModelError(f"tokenizer {ref}: has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


LOAD_ONLY_KEYS = ("local_files_only", "is_local", "cache_dir", "force_download", "proxies", "token",
                  "_commit_hash", "trust_remote_code")
"""How a tokenizer was loaded, which transformers writes back into ``tokenizer_config.json``
(``local_files_only`` comes from ``HF_HUB_OFFLINE``): never part of a saved checkpoint."""


def save_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    """``save_pretrained`` without the loading options, so the files depend on the tokenizer only."""
    tokenizer.save_pretrained(out_dir)
    config_file = Path(out_dir) / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        kept = {k: v for k, v in config.items() if k not in LOAD_ONLY_KEYS}
        if kept != config:
            config_file.write_text(json.dumps(kept, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                   encoding="utf-8")


def pad_rows(rows: list[list], fill: float | int, dtype: torch.dtype, left: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(padded, mask)`` of shape ``[len(rows), longest row]``: each row's values at the
    start (or, ``left``, at the end) of its line, ``fill`` elsewhere; ``mask`` is True on
    the row's own positions. One copy of all values, no Python loop per row. On the CPU, where
    batches are laid out; models get them on their device."""
    cpu = torch.device("cpu")
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.long, device=cpu)
    width = int(lengths.max())
    positions = torch.arange(width, device=cpu)[None, :]
    mask = positions >= width - lengths[:, None] if left else positions < lengths[:, None]
    padded = torch.full((len(rows), width), fill, dtype=dtype, device=cpu)
    padded[mask] = torch.tensor([x for row in rows for x in row], dtype=dtype, device=cpu)  # row-major order of mask
    return padded, mask


def pad_ids(rows: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows as a model's ``(input_ids, attention_mask)``, both ``long``."""
    ids, mask = pad_rows(rows, pad_id, torch.long, left=left)
    return ids, mask.long()


class _UnpaddedRowsFilter(logging.Filter):
    """Drops transformers' 'input_ids may be padded' warning while :func:`unpadded_rows` is active."""

    active = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.active and "attention_mask" in record.getMessage())


_UNPADDED = _UnpaddedRowsFilter()
logging.getLogger("transformers.modeling_utils").addFilter(_UNPADDED)


@contextlib.contextmanager
def unpadded_rows() -> Iterator[None]:
    """For rows that hold no padding but may hold EOS (packed rows, windows of a token stream, where
    EOS is also the pad token): transformers' warning that they may be padded would only mislead."""
    _UNPADDED.active = True
    try:
        yield
    finally:
        _UNPADDED.active = False
