"""Padding ragged rows: against a plain per-row loop, both sides, ids and floats."""

from __future__ import annotations

import pytest
import torch

from minichatgpt.models.tokenizer import pad_ids, pad_rows


def loop_pad(rows: list[list], fill, dtype, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    out = [[fill] * width for _ in rows]
    mask = [[False] * width for _ in rows]
    for i, row in enumerate(rows):
        start = width - len(row) if left else 0
        for j, x in enumerate(row):
            out[i][start + j] = x
            mask[i][start + j] = True
    return torch.tensor(out, dtype=dtype), torch.tensor(mask)


@pytest.mark.parametrize("left", [False, True])
def test_pad_rows_matches_a_plain_loop(left: bool) -> None:
    ids = [[5, 6, 7], [1], [], [2, 3, 4, 9, 8]]
    got, mask = pad_rows(ids, 0, torch.long, left=left)
    want, want_mask = loop_pad(ids, 0, torch.long, left)
    assert got.dtype == torch.long and torch.equal(got, want) and torch.equal(mask, want_mask)
    values = [[0.5, -1.25], [3.0, 2.0, 1.0], [7.5]]
    got, mask = pad_rows(values, -1.0, torch.float32, left=left)
    want, want_mask = loop_pad(values, -1.0, torch.float32, left)
    assert got.dtype == torch.float32 and torch.equal(got, want) and torch.equal(mask, want_mask)


def test_pad_rows_hand_computed() -> None:
    got, mask = pad_rows([[1, 2], [3]], 9, torch.long, left=True)
    assert got.tolist() == [[1, 2], [9, 3]] and mask.tolist() == [[True, True], [False, True]]
    got, mask = pad_rows([[1, 2], [3]], 9, torch.long)
    assert got.tolist() == [[1, 2], [3, 9]] and mask.tolist() == [[True, True], [True, False]]


def test_pad_ids_is_a_model_input() -> None:
    """input_ids and attention_mask as transformers wants them: long, 1 on real tokens."""
    ids, mask = pad_ids([[4, 5], [6]], 0, left=True)
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[4, 5], [0, 6]] and mask.tolist() == [[1, 1], [0, 1]]
    ids, mask = pad_ids([[4], [6, 7, 8]], 3)
    assert ids.tolist() == [[4, 3, 3], [6, 7, 8]] and mask.tolist() == [[1, 0, 0], [1, 1, 1]]
