"""Ragged rows (token ids, per-token values) to one padded tensor and its mask.

Its own module, importing only torch, because both the one-off training stages and the
per-iteration stages use it: editing the PPO math must not retrain the base models.
"""

from __future__ import annotations

import torch


def pad_rows(rows: list[list], fill: float | int, dtype: torch.dtype, left: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(padded, mask)`` of shape ``[len(rows), longest row]``: each row's values at the
    start (or, ``left``, at the end) of its line, ``fill`` elsewhere; ``mask`` is True on
    the row's own positions. One copy of all values, no Python loop per row."""
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)
    width = int(lengths.max())
    positions = torch.arange(width)[None, :]
    mask = positions >= width - lengths[:, None] if left else positions < lengths[:, None]
    padded = torch.full((len(rows), width), fill, dtype=dtype)
    padded[mask] = torch.tensor([x for row in rows for x in row], dtype=dtype)  # row-major order of mask
    return padded, mask


def pad_ids(rows: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows as a model's ``(input_ids, attention_mask)``, both ``long``."""
    ids, mask = pad_rows(rows, pad_id, torch.long, left=left)
    return ids, mask.long()
