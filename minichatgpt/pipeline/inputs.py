"""What every iteration stage of one kind runs with: its params and its code, in one small file.

DVC checks every dependency of every stage on each ``dvc repro``. With the params listed per stage
and the package as a directory dependency, a run of 200 iterations meant 800 parses of params.yaml
and 800 walks of the package: a third of a no-op ``dvc repro`` (benchmarks/README.md). So the
``check_params`` stage writes ``data/inputs/<stage>.json`` for rollout, score, advantages and
update: the values of the settings that stage reads (:data:`STAGE_PARAMS`) and the SHA-256 of
every code file it may run (:func:`code_files`). Each iteration stage depends on that one file
instead. A valid change of a value rewrites only the files of the stages that read it, so it
reruns exactly what it can affect, as per-stage ``params:`` did.

The stage checks the file before it computes anything (:func:`verify`): params.yaml's values and
the code on disk must be the file's, or DVC would record outputs of other values or other code
under its hash (after ``dvc repro -s`` of one stage, or an edit made after check_params ran).
"""

from __future__ import annotations

import json
from pathlib import Path

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: every iteration stage imports this first
if TYPE_CHECKING:
    import argparse
    from typing import Any

DIR = "data/inputs"
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "rollout": ("ppo.batch_size", "ppo.seed", "generation", "runtime.threads", "runtime.device", "runtime.dtype"),
    "score": ("ppo.init_kl_coef", "ppo.kl_penalty", "ppo.missing_eos_penalty", "ppo.use_score_scaling",
              "ppo.use_score_norm", "ppo.score_clip", "generation.forward_batch_size",
              "reward.model",  # a module:function reward runs from here, never from models/reward
              "runtime.threads", "runtime.device", "runtime.dtype"),
    "advantages": ("ppo.gamma", "ppo.lam", "ppo.whiten_rewards"),
    "update": ("ppo.learning_rate", "ppo.batch_size", "ppo.mini_batch_size", "ppo.ppo_epochs", "ppo.init_kl_coef",
               "ppo.adap_kl_ctrl", "ppo.target", "ppo.horizon", "ppo.cliprange", "ppo.cliprange_value",
               "ppo.vf_coef", "ppo.ratio_threshold", "ppo.max_grad_norm", "ppo.gradient_accumulation_steps",
               "ppo.early_stopping", "ppo.target_kl", "ppo.missing_eos_penalty", "ppo.use_score_scaling",
               "ppo.use_score_norm", "ppo.score_clip", "ppo.seed", "lora", "runtime.threads", "runtime.device",
               "runtime.dtype"),
}
"""The settings each iteration stage reads, by dotted key or whole section (tests/test_stage_params.py
checks that they are exactly those read). runtime.launcher is in the stages' cmd."""
PACKAGE = "minichatgpt"
NOT_RUN = ("minichatgpt/notebook/", "minichatgpt/experiments/")
"""The notebook API and the seed notebook's config: no stage imports them (tests/test_deps.py), so
editing them reruns nothing (.dvcignore leaves them out of check_params' package dependency too)."""


class InputsChangedError(ValueError):
    """params.yaml or the code is not what a stage's inputs file records."""


def path_of(stage: str) -> str:
    return f"{DIR}/{stage}.json"


def code_files(root: Path, stage: str) -> list[str]:
    """The stage's script and every file of the package but :data:`NOT_RUN` and bytecode, as
    paths relative to ``root``: what the package directory dependency used to hash."""
    files = [f"stages/{stage}.py"]
    for path in sorted((root / PACKAGE).rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not rel.startswith(NOT_RUN) and "__pycache__" not in path.parts \
                and not path.name.endswith(".pyc") and not path.name.startswith(".tmp-"):
            files.append(rel)
    return files


def param_values(raw: dict, keys: tuple[str, ...]) -> dict[str, Any]:
    """key -> validated value (defaults filled in): one setting for ``section.name``, the whole
    section as a mapping for ``section``."""
    from minichatgpt.params import as_dict, section

    sections: dict[str, dict[str, Any]] = {}
    values: dict[str, Any] = {}
    for key in keys:
        name, _, field = key.partition(".")
        if name not in sections:  # each section validated once, not once per key
            sections[name] = as_dict(section(raw, name))
        values[key] = sections[name][field] if field else sections[name]
    return values


def compute(root: Path, stage: str, raw: dict) -> dict[str, Any]:
    """The contents of ``data/inputs/<stage>.json`` for params ``raw`` and the code under ``root``."""
    from minichatgpt.pipeline.artifacts import _sha256  # the checksum of SHA256SUMS (the stage imports it anyway)

    return {"stage": stage, "params": param_values(raw, STAGE_PARAMS[stage]),
            "code": {rel: _sha256(root / rel) for rel in code_files(root, stage)}}


def write_all(root: Path, raw: dict) -> None:
    from minichatgpt.pipeline.artifacts import write_json

    for stage in STAGE_PARAMS:
        write_json(compute(root, stage, raw), root / path_of(stage))


def _first_difference(recorded: dict, current: dict) -> str | None:
    for key in sorted(recorded.keys() | current.keys()):
        if recorded.get(key) != current.get(key):
            return key
    return None


def verify(inputs: str | Path, params: str | Path, root: Path = Path(".")) -> dict:
    """Refuse to run unless params.yaml and the code are what ``inputs`` records; returns the
    loaded params, which the stage then reads (so it computes with exactly the checked values)."""
    from minichatgpt.params import load_yaml

    inputs = Path(inputs)
    try:
        recorded = json.loads(inputs.read_text())
        stage = recorded["stage"]
    except FileNotFoundError:
        raise InputsChangedError(f"{inputs}: not found; `dvc repro` writes it (stage check_params)") from None
    except (ValueError, KeyError, TypeError):
        raise InputsChangedError(f"{inputs}: not an inputs file; `dvc repro check_params` rewrites it") from None
    raw = load_yaml(params)
    current = compute(root, stage, raw)
    rerun = "run `dvc repro` (check_params, which comes first, rewrites it)"
    key = _first_difference(recorded["params"], current["params"])
    if key is not None:
        raise InputsChangedError(f"{params}: {key} is {current['params'].get(key)!r} but {inputs} (written by "
                                 f"check_params) records {recorded['params'].get(key)!r}; {rerun}")
    changed = _first_difference(recorded["code"], current["code"])
    if changed is not None:
        raise InputsChangedError(f"{changed}: changed since check_params recorded the code in {inputs}; {rerun}")
    return raw


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """An iteration stage's argument parser: the shared one, and ``--inputs``."""
    from minichatgpt.runtime.stage import parser as stage_parser

    p = stage_parser(name, doc)
    p.add_argument("--inputs", help=f"{path_of(name)}: refuse to run unless the params and the code are what "
                   "it records")
    return p


def stage_params(args: argparse.Namespace) -> dict:
    """The loaded params file, checked against ``--inputs`` when given (a run by hand may leave it out)."""
    if args.inputs:
        return verify(args.inputs, args.params)
    from minichatgpt.params import load_yaml

    return load_yaml(args.params)
