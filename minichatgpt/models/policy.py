"""Policy (causal LM + value head) and checkpoints.

Checkpoints are directories a Hugging Face user can open with
``AutoModelForCausalLM.from_pretrained``: safetensors weights, JSON config and the
tokenizer, plus ``value_head.safetensors``, ``optimizer.safetensors`` and
``state.json`` so the next iteration continues exactly. Nothing is pickled.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minichatgpt.models.sources import ModelError, pretrained_kwargs
from minichatgpt.models.tokenizer import load_tokenizer, save_tokenizer
from minichatgpt.pipeline.artifacts import verify_checksums

log = logging.getLogger(__name__)

SOURCE_FILE = "source.json"
"""written instead of weights when the policy comes from a hub name or outside path."""


def _cache_kwarg(model: nn.Module) -> str:
    """transformers >= 5.2x calls the KV cache ``cache``; earlier ``past_key_values``."""
    if hasattr(model, "get_base_model"):  # a peft wrapper forwards **kwargs to the base model
        model = model.get_base_model()
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def use_fused_activations(model: nn.Module) -> nn.Module:
    """Swap transformers' Python tanh-GELU (``gelu_new``: GPT-2, GPT-Neo, ...) for PyTorch's fused
    kernel of the same formula: one op forward and backward instead of eight (outputs agree to
    ~2e-7). A seventh of a small policy's PPO step on CPU went to the Python version."""
    from transformers.activations import GELUTanh, NewGELUActivation

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())
    return model


class PolicyWithValueHead(nn.Module):
    """A causal LM with a scalar value head on its last hidden state (TRL's design)."""

    def __init__(self, lm: nn.Module, seed: int = 0):
        super().__init__()
        self.pretrained_model = use_fused_activations(lm)
        hidden = lm.config.hidden_size if hasattr(lm.config, "hidden_size") else lm.config.n_embd
        gen = torch.Generator().manual_seed(seed)
        self.v_head = nn.Linear(hidden, 1)
        with torch.no_grad():
            bound = 1.0 / hidden**0.5
            self.v_head.weight.uniform_(-bound, bound, generator=gen)
            self.v_head.bias.zero_()
        self._cache_kwarg = _cache_kwarg(lm)

    @property
    def config(self) -> Any:
        return self.pretrained_model.config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool = False,
        logits_to_keep: Any = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Return ``(logits, values, cache)``; values are ``(B, T)``.

        ``logits_to_keep`` (passed to the LM when non-zero) limits the vocabulary
        projection to the positions that are needed, as in transformers' ``generate``.
        """
        kwargs = {self._cache_kwarg: cache} if cache is not None else {}
        if not isinstance(logits_to_keep, int) or logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        out = self.pretrained_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=use_cache, output_hidden_states=True, **kwargs,
        )
        values = self.v_head(out.hidden_states[-1]).squeeze(-1)
        new_cache = None
        if use_cache:
            new_cache = out["cache"] if "cache" in out else out["past_key_values"]
        return out.logits, values, new_cache


ADAPTER_CONFIG = "adapter_config.json"
"""peft's file: the checkpoint holds LoRA adapters over the base model named in source.json."""


def source_of(ckpt: Path) -> str:
    """Where the (base) LM weights of a checkpoint directory live: itself, or a recorded
    name or directory, followed through checkpoints that record one in turn."""
    verify_checksums(ckpt)  # every directory on the way, before any of its files is read
    src = ckpt / SOURCE_FILE
    if src.is_file():
        name = json.loads(src.read_text())["model"]
        return source_of(Path(name)) if (Path(name) / SOURCE_FILE).is_file() else name
    if not (ckpt / "config.json").is_file():
        raise ModelError(f"{ckpt}: not a checkpoint (no config.json or {SOURCE_FILE}); run `dvc repro pretrain`")
    return str(ckpt)


def load_causal_lm(ref: str | Path) -> nn.Module:
    """A causal LM from a checkpoint dir, local model dir or hub name, in eval mode."""
    from transformers import AutoModelForCausalLM

    path = Path(ref)
    name = source_of(path) if path.is_dir() else str(ref)
    try:
        name, extra = pretrained_kwargs(name)
        model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=False, dtype=torch.float32, **extra)
    except (OSError, ValueError) as err:
        raise ModelError(f"policy {name}: cannot be loaded: {err}") from None
    return use_fused_activations(model).eval()


def dequantized(model: nn.Module) -> nn.Module:
    """A GGUF-loaded (already dequantized) model as a plain float32 one that ``save_pretrained`` accepts."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    return plain.eval()


def load_policy(ckpt: str | Path, seed: int, trainable: bool = False) -> tuple[PolicyWithValueHead, Any, dict]:
    """Policy with value head, tokenizer and training state from a checkpoint dir, on the CPU
    (the caller moves it to its device, after adding adapters, so their initial weights do not depend on it).

    A checkpoint without a value head (iteration 0) gets one initialised from ``seed``.
    LoRA adapters are applied to their base model: kept separate when ``trainable``
    (the update trains them), merged into the weights otherwise (generation, scoring).
    """
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    lm = load_causal_lm(ckpt)
    if (ckpt / ADAPTER_CONFIG).is_file():
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(ckpt), is_trainable=trainable)
        if not trainable:
            lm = lm.merge_and_unload().eval()
    policy = PolicyWithValueHead(lm, seed=seed)
    head = ckpt / "value_head.safetensors"
    if head.is_file():
        policy.v_head.load_state_dict(load_file(head))
    tokenizer = load_tokenizer(source_of(ckpt))
    if len(tokenizer) > lm.config.vocab_size:
        raise ModelError(f"{ckpt}: tokenizer has {len(tokenizer)} tokens but the model only {lm.config.vocab_size}")
    state_file = ckpt / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else initial_state()
    return policy.eval(), tokenizer, state


def add_lora(policy: PolicyWithValueHead, r: int, alpha: float, dropout: float, modules: list[str] | None,
             seed: int) -> None:
    """Freeze the policy's LM and give it trainable LoRA adapters (B = 0: the model is unchanged)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # peft draws the A matrices from torch's global generator
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules, task_type="CAUSAL_LM")
    policy.pretrained_model = get_peft_model(policy.pretrained_model, config)


def save_policy(
    out_dir: Path, policy: PolicyWithValueHead, tokenizer: Any,
    optimizer: torch.optim.Optimizer | None = None, state: dict | None = None,
) -> None:
    """Write a checkpoint into ``out_dir`` (callers pass an atomic temp dir)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    lm = policy.pretrained_model
    if hasattr(lm, "peft_config"):  # adapters only; the base stays where it was loaded from
        lm.save_pretrained(out_dir, safe_serialization=True)
        (out_dir / "README.md").unlink(missing_ok=True)  # peft's model card
        base = lm.get_base_model().name_or_path
        (out_dir / SOURCE_FILE).write_text(json.dumps({"model": base}, indent=2) + "\n")
    else:
        lm.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(tokenizer, out_dir)
    head = {k: v.cpu().contiguous() for k, v in policy.v_head.state_dict().items()}
    save_file(head, out_dir / "value_head.safetensors")
    if optimizer is not None:
        tensors, meta = optimizer_to_tensors(optimizer)
        save_file(tensors, out_dir / "optimizer.safetensors")
        (out_dir / "optimizer.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if state is not None:
        write_state(out_dir, state)


def initial_state() -> dict:
    """Training state of an iteration-0 checkpoint: no KL coefficient yet, no optimizer steps."""
    return {"iteration": 0, "kl_coef": None, "step": 0}


def write_state(out_dir: Path, state: dict) -> None:
    (out_dir / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimizer state dict into safetensors-friendly tensors plus JSON."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, pstate in sd["state"].items():
        for key, value in pstate.items():
            tensors[f"state.{idx}.{key}"] = torch.as_tensor(value).cpu().clone().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, ckpt: Path) -> bool:
    """Restore optimizer moments saved by :func:`save_policy`; False if there are none."""
    from safetensors.torch import load_file

    file = ckpt / "optimizer.safetensors"
    if not file.is_file():
        return False
    verify_checksums(ckpt)
    tensors = load_file(file)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    sd = optimizer.state_dict()
    n_params = len(sd["param_groups"][0]["params"])
    if len(state) != n_params:
        raise ModelError(f"{file}: optimizer state covers {len(state)} parameters, the policy has {n_params}")
    sd["state"] = state
    optimizer.load_state_dict(sd)
    return True
