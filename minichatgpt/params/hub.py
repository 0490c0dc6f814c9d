"""Settings that name Hugging Face hub repositories, checked before any stage runs.

Without network, ``from_pretrained`` and ``load_dataset`` retry for half a minute and then
fail with a traceback in the middle of the run. ``check_params`` asks this module first: a
hub name that is neither in the local cache nor reachable within a few seconds stops the
run with one message that says what to download and which setting to point at it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from minichatgpt.models.sources import PACKAGE_PREFIX, is_function_ref

REPO_SETTINGS = {
    ("pretrain", "model"): ("model", "embedded"),
    ("reward", "model"): ("model", "embedded"),
    ("reward", "init"): ("model", "scratch"),
    ("data", "dataset"): ("dataset", "packaged"),
}
"""setting -> (hub repository type, the value that names no repository)."""

TIMEOUT_S = 3.0


def hub_names(checked: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(setting, value, repo type)`` of each setting that names a hub repository: not the
    built-in value, a local path, a ``pkg://`` file or a ``module:function`` reward."""
    names = []
    for (section, key), (kind, builtin) in REPO_SETTINGS.items():
        value = getattr(checked[section], key)
        if value == builtin or value.startswith(PACKAGE_PREFIX) or Path(value).exists() or is_function_ref(value):
            continue
        if Path(value).is_absolute() or value.startswith((".", "~")) or value.count("/") > 1:
            continue  # a path that does not exist: the stage that reads it names it
        names.append((f"{section}.{key}", value, kind))
    return names


def hub_unreachable_reason(timeout: float = TIMEOUT_S) -> str | None:
    """Why the hub cannot be reached (offline switch, no connection), or None if it can."""
    for switch in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(switch, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{switch}={os.environ[switch]}"
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"no connection to {host}:{port} within {timeout:g} s ({type(err).__name__})"
    return None


def is_cached(name: str, kind: str) -> bool:
    """Whether the hub cache holds a snapshot of the repository (offline loading then works)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    probe = "config.json" if kind == "model" else "README.md"
    found = try_to_load_from_cache(name, probe, repo_type=kind)
    return isinstance(found, str)


def check_reachable(checked: dict[str, Any]) -> str | None:
    """One message naming every hub repository that cannot be loaded here, or None."""
    missing = [(setting, name, kind) for setting, name, kind in hub_names(checked) if not is_cached(name, kind)]
    if not missing:
        return None
    reason = hub_unreachable_reason()
    if reason is None:
        return None
    lines = [f"params.yaml: the Hugging Face hub cannot be reached ({reason}) and the local cache does not "
             "hold " + ", ".join(f"{setting}={name!r}" for setting, name, _ in missing) + ". Download "
             + ("it" if len(missing) == 1 else "them") + " where there is network, copy the directory here, "
             "and point params.yaml at it:"]
    for setting, name, kind in missing:
        local = ("data/" if kind == "dataset" else "models/") + name.rsplit("/", 1)[-1]
        extra = " --repo-type dataset" if kind == "dataset" else ""
        lines.append(f"  huggingface-cli download {name}{extra} --local-dir {local}   then   "
                     f"dvc exp run -S {setting}={local}")
    return "\n".join(lines)
