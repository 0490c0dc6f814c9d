"""Every setting of ``params.yaml``, declared once: type, default, one-line doc and constraint.

The dataclass fields below are the only declaration. ``params.yaml`` is written from them
(``python -m minichatgpt.params [PRESET]``,
:mod:`minichatgpt.params.presets`), a preset holds only the values it changes, and
each stage reads only its own sections. Unknown keys are refused with the closest valid name
and every check names the field and the bad value, so a typo in ``dvc exp run -S`` fails at
once instead of training on defaults. Needs no torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import operator
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KL_ESTIMATORS = ("kl", "abs", "mse", "full", "k3")
"""``ppo.kl_penalty`` values (TRL's names); :func:`minichatgpt.core.kl_penalty` implements them."""


class ParamsError(ValueError):
    """A value in params.yaml is missing, mistyped or out of range."""


def setting(default: Any, doc: str, check: str | tuple | None = None) -> Any:
    """A declared setting. ``check`` is ``'>= 1'``-style, an interval ``'in (0, 1]'``,
    ``'non-empty'`` or a tuple of allowed values; checks across fields live in ``validate``."""
    return dataclasses.field(default=default, metadata={"doc": doc, "check": check})


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
"""``runtime.device`` values: ``auto`` (CUDA when torch sees a GPU, else CPU), ``cpu``, ``cuda``, ``cuda:N``."""
DTYPE_NAMES = ("float32", "bfloat16")
"""``runtime.dtype`` values: the compute dtype of forward passes (weights and Adam state stay float32)."""


@dataclass
class RuntimeParams:
    threads: int = setting(2, "torch threads; outputs are bit-identical only for the same count", ">= 1")
    launcher: str = setting("python", "runs rollout and update: 'python' or 'accelerate launch [options]'")
    device: str = setting("cpu", "cpu, cuda, cuda:N or auto (GPU if any: outputs then depend on the machine)")
    dtype: str = setting("float32", "compute dtype: float32, or bfloat16 autocast (weights and Adam stay float32)",
                         DTYPE_NAMES)

    def validate(self) -> None:
        _check(self.launcher == "python" or self.launcher.startswith("accelerate launch"), "runtime.launcher",
               self.launcher, "'python' or 'accelerate launch [options]'")
        _check(bool(DEVICE_PATTERN.fullmatch(self.device)), "runtime.device", self.device,
               "auto, cpu, cuda or cuda:N")


@dataclass
class DataParams:
    dataset: str = setting("packaged", "'packaged' (25k IMDB + 8.5k RT reviews), a hub dataset, or a dir/CSV",
                           "non-empty")
    seed: int = setting(0, "seed of the train/eval split and of the sampled prompt lengths", ">= 0")
    max_reviews: int = setting(0, "use only the first N reviews (0 = all)", ">= 0")
    eval_prompts: int = setting(512, "held-out prompts for evaluate, never seen in training", ">= 2")
    input_min_text_length: int = setting(2, "shortest prompt, in policy tokens", ">= 1")
    input_max_text_length: int = setting(8, "longest prompt, in policy tokens (inclusive)", ">= 1")

    def validate(self) -> None:
        _check(self.input_max_text_length >= self.input_min_text_length, "data.input_max_text_length",
               self.input_max_text_length, ">= data.input_min_text_length")


@dataclass
class PretrainParams:
    model: str = setting("embedded", "'embedded' (a small GPT-2 trained here), a hub name or a local dir",
                         "non-empty")
    vocab_size: int = setting(8192, "byte-level BPE vocabulary trained on the corpus (embedded)", ">= 300")
    n_layer: int = setting(2, "transformer blocks (embedded)", ">= 1")
    n_head: int = setting(4, "attention heads (embedded)", ">= 1")
    n_embd: int = setting(128, "hidden size, a multiple of n_head (embedded)", ">= 1")
    n_positions: int = setting(64, "context length; the longest prompt plus response must fit", ">= 1")
    block_size: int = setting(64, "tokens per training chunk", ">= 1")
    batch_size: int = setting(32, "chunks per optimizer step", ">= 1")
    learning_rate: float = setting(3e-3, "AdamW learning rate", "> 0")
    max_steps: int = setting(800, "optimizer steps (a count, not wall time, keeps it deterministic)", ">= 1")
    seed: int = setting(0, "seed of the initial weights and the chunk order", ">= 0")

    def validate(self) -> None:
        _check(self.n_embd % self.n_head == 0, "pretrain.n_embd", self.n_embd, "a multiple of pretrain.n_head")
        _check(self.block_size <= self.n_positions, "pretrain.block_size", self.block_size, "<= pretrain.n_positions")


@dataclass
class RewardParams:
    model: str = setting("embedded", "'embedded' (trained here), a text-classification model, or module:function",
                         "non-empty")
    init: str = setting("scratch", "embedded: 'scratch' or an encoder to fine-tune (pkg://, hub name, dir)",
                        "non-empty")
    vocab_size: int = setting(4096, "BPE vocabulary (embedded, scratch)", ">= 1")
    n_layer: int = setting(2, "BERT layers (embedded, scratch)", ">= 1")
    n_head: int = setting(4, "attention heads (embedded, scratch)", ">= 1")
    n_embd: int = setting(128, "hidden size, a multiple of n_head (embedded, scratch)", ">= 1")
    max_length: int = setting(64, "longest training example in tokens; half are cut to 8..max_length", ">= 8")
    batch_size: int = setting(32, "examples per optimizer step", ">= 1")
    learning_rate: float = setting(1e-3, "AdamW learning rate", "> 0")
    max_steps: int = setting(1200, "optimizer steps", ">= 1")
    seed: int = setting(0, "seed of the initial weights, the example order and the cuts", ">= 0")

    def validate(self) -> None:
        _check(self.n_embd % self.n_head == 0, "reward.n_embd", self.n_embd, "a multiple of reward.n_head")


@dataclass
class GenerationParams:
    output_min_length: int = setting(4, "shortest response in tokens; one length is sampled per prompt", ">= 1")
    output_max_length: int = setting(16, "longest response in tokens (inclusive)", ">= 1")
    top_k: int = setting(0, "sample from the k most likely tokens only (0 = all, as the notebook)", ">= 0")
    top_p: float = setting(1.0, "nucleus sampling mass (1 = off)", "in (0, 1]")
    forward_batch_size: int = setting(128, "rows per forward pass; float sums, so results depend on it", ">= 1")

    def validate(self) -> None:
        _check(self.output_max_length >= self.output_min_length, "generation.output_max_length",
               self.output_max_length, ">= generation.output_min_length")


@dataclass
class PPOParams:
    """TRL legacy PPOConfig names; :data:`TRL_DEFAULTS` lists where the defaults differ from TRL's."""

    iterations: int = setting(10, "PPO iterations (rollout -> score -> advantages -> update), iterations/*/dvc.yaml",
                              ">= 1")
    learning_rate: float = setting(6e-4, "Adam learning rate (TRL: 1.41e-5, too small for the embedded policy)", "> 0")
    batch_size: int = setting(256, "rollouts per iteration", ">= 2")
    mini_batch_size: int = setting(32, "rollouts per gradient step (TRL: 1)", ">= 1")
    ppo_epochs: int = setting(4, "passes over each batch", ">= 1")
    init_kl_coef: float = setting(0.1, "initial coefficient of the KL penalty (TRL: 0.2)", ">= 0")
    adap_kl_ctrl: bool = setting(True, "adapt the KL coefficient towards `target`")
    target: float = setting(12.0, "KL target of the adaptive controller, nats per response (TRL: 6)", "> 0")
    horizon: float = setting(10000.0, "horizon of the adaptive controller, in rollouts", "> 0")
    gamma: float = setting(1.0, "discount of GAE", "in [0, 1]")
    lam: float = setting(0.95, "lambda of GAE", "in [0, 1]")
    cliprange: float = setting(0.2, "policy ratio clip range", "> 0")
    cliprange_value: float = setting(0.2, "value clip range", "> 0")
    vf_coef: float = setting(0.1, "value loss coefficient", ">= 0")
    kl_penalty: str = setting("kl", "per-token KL estimator", KL_ESTIMATORS)
    ratio_threshold: float = setting(10.0, "skip a minibatch (no step) whose mean ratio exceeds this", "> 1")
    max_grad_norm: float = setting(0.0, "clip the gradient norm (0 = off, TRL's None)", ">= 0")
    gradient_accumulation_steps: int = setting(1, "parts per minibatch; the update equals the unsplit one", ">= 1")
    use_score_scaling: bool = setting(False, "divide scores by their running standard deviation")
    use_score_norm: bool = setting(False, "with use_score_scaling: also subtract the running mean")
    score_clip: float = setting(0.0, "clip scores to +-score_clip after scaling (0 = off, TRL's None)", ">= 0")
    missing_eos_penalty: float = setting(0.0, "subtracted from the score of a response without EOS (0 = off)", ">= 0")
    whiten_rewards: bool = setting(True, "whiten per-token rewards over the batch before GAE (TRL: false)")
    early_stopping: bool = setting(False, "stop the epochs once a minibatch's KL exceeds 1.5 * target_kl")
    target_kl: float = setting(1.0, "KL bound of early_stopping", "> 0")
    seed: int = setting(0, "seed of prompt sampling, generation and minibatch order", ">= 0")

    def validate(self) -> None:
        _check(self.batch_size % self.mini_batch_size == 0, "ppo.batch_size", self.batch_size,
               f"a multiple of ppo.mini_batch_size ({self.mini_batch_size})")
        _check(self.mini_batch_size % self.gradient_accumulation_steps == 0, "ppo.mini_batch_size",
               self.mini_batch_size, "a multiple of ppo.gradient_accumulation_steps")
        _check(not self.use_score_norm or self.use_score_scaling, "ppo.use_score_norm", self.use_score_norm,
               "false unless ppo.use_score_scaling is true")


TRL_DEFAULTS = {"learning_rate": 1.41e-5, "mini_batch_size": 1, "init_kl_coef": 0.2, "target": 6.0,
                "whiten_rewards": False}
"""TRL legacy PPOConfig's defaults where this project's differ: 1.41e-5 does not move the 1.5M-parameter
embedded policy, and 32-row minibatches make an epoch 8 steps instead of 256. Whitened rewards with a
KL penalty from 0.1 towards 12 nats learn more per nat of KL over a long run: in 200 iterations at
batch 64, a held-out gain of 1.08 at KL 11, against 0.52 at KL 5.8 with these three at TRL's values
(benchmarks/README.md)."""


@dataclass
class EvaluateParams:
    seed: int = setting(1, "seed of the held-out generations (the same before and after)", ">= 0")
    samples: int = setting(8, "before/after samples written to metrics/samples.json", ">= 0")


@dataclass
class LoraParams:
    r: int = setting(0, "LoRA rank of the policy's adapters (peft); 0 = train every weight", ">= 0")
    alpha: float = setting(16.0, "LoRA scaling numerator (updates are scaled by alpha / r)", "> 0")
    dropout: float = setting(0.0, "dropout on the adapters' input", "in [0, 1)")
    target_modules: str = setting("auto", "comma-separated module names, or 'auto' (peft's default)", "non-empty")

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
    """Every section and the checks across sections (the `check_params` stage)."""
    checked: dict[str, Any] = {name: section(raw, name) for name in SECTIONS}
    data, gen, pretrain = checked["data"], checked["generation"], checked["pretrain"]
    room = pretrain.n_positions - data.input_max_text_length
    if pretrain.model == "embedded":  # otherwise rollout@1 would find out, after DVC deleted its outputs
        _check(gen.output_max_length <= room, "generation.output_max_length", gen.output_max_length,
               f"<= pretrain.n_positions - data.input_max_text_length ({room})")
    return checked


def declared() -> dict[str, dict[str, dict[str, Any]]]:
    """Every declared setting: section -> key -> type, default, doc and check (JSON-ready)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        out[name] = {f.name: {"type": getattr(hints[f.name], "__name__", str(hints[f.name])), "default": f.default,
                              "doc": f.metadata["doc"], "check": _describe(f.metadata["check"])}
                     for f in dataclasses.fields(cls)}
    return out


def _describe(check: str | tuple | None) -> str | None:
    return f"one of {', '.join(check)}" if isinstance(check, tuple) else check


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ParamsError(f"params.yaml: {name}={value!r} is not allowed; expected {allowed}")


_COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def _satisfies(value: Any, check: str | tuple) -> bool:
    if isinstance(check, tuple):
        return value in check
    if check == "non-empty":
        return bool(value.strip())
    if check.startswith("in "):  # an interval: "in (0, 1]"
        low, high = (float(x) for x in check[4:-1].split(","))
        return (low <= value if check[3] == "[" else low < value) and (value <= high if check[-1] == "]"
                                                                       else value < high)
    op, bound = check.split()
    return _COMPARE[op](value, float(bound))


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
    for name, field in fields.items():  # field by field in declaration order, then the cross-field checks
        check = field.metadata.get("check")
        if check is not None and not _satisfies(getattr(obj, name), check):
            _check(False, f"{prefix}.{name}", getattr(obj, name), _describe(check))
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
    known = set(SECTIONS)
    for key in raw:
        if key == "iters":
            raise ParamsError(f"{path}: section iters was replaced by ppo.iterations (the number of PPO "
                              "iterations): delete iters and set ppo.iterations")
        if key not in known:
            raise ParamsError(f"{path}: unknown section {key}; did you mean {closest(key, sorted(known))}?")
    return raw


def section(raw: dict, name: str) -> Any:
    """The validated dataclass for one section of a loaded params.yaml."""
    if name not in SECTIONS:
        raise ParamsError(f"params.yaml: unknown section {name!r}; known: {', '.join(SECTIONS)}")
    return _build(SECTIONS[name], raw.get(name), name)


def iterations(raw: dict) -> dict[str, Iteration]:
    """Each iteration of the run ('1'..'N' for ppo.iterations = N) and the one it continues from."""
    n = section(raw, "ppo").iterations
    return {str(i): Iteration(prev=str(i - 1)) for i in range(1, n + 1)}


def as_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)



__all__ = [
    "ParamsError", "RuntimeParams", "DataParams", "PretrainParams", "RewardParams", "GenerationParams",
    "PPOParams", "EvaluateParams", "LoraParams", "Iteration", "TRL_DEFAULTS", "load_yaml", "section", "iterations",
    "as_dict", "closest", "validate_all", "declared", "setting",
]


