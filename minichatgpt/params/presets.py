"""params.yaml written from the declarations, with a preset's values over the defaults.

``python -m minichatgpt.params [PRESET]`` writes it; a preset (``presets/*.yaml``) holds only
the values it changes, so a new setting or a changed default reaches every preset.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from minichatgpt.params import SECTIONS, ParamsError, as_dict, closest, validate_all

HEADER = """\
# minichatgpt parameters, written by `python -m minichatgpt.params{preset}` from the declarations
# in minichatgpt/params/__init__.py (each comment is the doc there). Each DVC stage reads only its
# own sections (dvc.yaml), so changing a value reruns exactly the stages it can affect.
"""


def defaults() -> dict[str, Any]:
    """The default params.yaml as a mapping."""
    return {name: as_dict(cls()) for name, cls in SECTIONS.items()}


def compose(preset: dict | None = None) -> dict[str, Any]:
    """The defaults with a preset's values over them."""
    out = defaults()
    if preset is not None and not isinstance(preset, dict):
        raise ParamsError(f"preset: expected a mapping of sections, found {type(preset).__name__}")
    for name, values in (preset or {}).items():
        if name not in out:
            raise ParamsError(f"preset: unknown section {name}; did you mean {closest(name, sorted(out))}?")
        if not isinstance(values, dict):
            raise ParamsError(f"preset: {name} must be a mapping, found {type(values).__name__}")
        out[name] = {**out[name], **values}
    validate_all(out)
    return out


def _scalar(value: Any) -> str:
    import yaml

    return yaml.safe_dump([value], default_flow_style=True, width=1000).strip()[1:-1]


def render(params: dict[str, Any], preset: str | None = None) -> str:
    """params.yaml text: every section and key in declaration order, each with its doc as a comment."""
    lines = [HEADER.format(preset=f" {preset}" if preset else "")]
    for name, cls in SECTIONS.items():
        lines.append(f"{name}:")
        for field in dataclasses.fields(cls):
            entry = f"  {field.name}: {_scalar(params[name][field.name])}"
            lines.append(f"{entry:<34}# {field.metadata['doc']}")
        lines.append("")
    return "\n".join(lines[:-1]) + "\n"


def main(argv: list[str] | None = None) -> None:
    """``python -m minichatgpt.params [PRESET] [--out params.yaml]``: write params.yaml atomically, and the
    iteration stages' dvc.yaml files beside it for its ppo.iterations."""
    import argparse
    import os
    import sys

    import yaml

    from minichatgpt.pipeline.iterations import TEMPLATE, write

    p = argparse.ArgumentParser(prog="python -m minichatgpt.params", description=main.__doc__)
    p.add_argument("preset", nargs="?", help="a preset file (e.g. presets/tiny.yaml): only what differs")
    p.add_argument("--out", default="params.yaml", help="the params file to write (default: params.yaml)")
    args = p.parse_args(argv)
    try:
        preset = yaml.safe_load(Path(args.preset).read_text()) if args.preset else None
        params = compose(preset)
        text = render(params, args.preset)
    except (OSError, yaml.YAMLError, ParamsError) as err:
        sys.exit(f"{args.preset}: {err}")
    tmp = Path(args.out).with_name(f".{Path(args.out).name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, args.out)
    root = Path(args.out).resolve().parent
    if (root / TEMPLATE).is_file():  # (a params file written elsewhere, e.g. a test's, has no pipeline)
        write(root, params["ppo"]["iterations"])
