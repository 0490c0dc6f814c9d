"""The iteration stages' dvc.yaml files, one per block of iterations, written from one template.

DVC rewrites a dvc.lock whole after every stage it runs, so with every iteration in one dvc.yaml
the bookkeeping of a stage grows with the run and a long run is quadratic. Here each block of
BLOCK iterations has its own ``iterations/<first>-<last>/dvc.yaml`` (and so its own dvc.lock):
the template ``iterations/stages.yaml`` verbatim, after a ``vars`` entry naming the block's
iterations. A block's file depends on its own range only, so lengthening a run adds files and
leaves the finished blocks byte-identical (their stages stay cached).

DVC cannot derive the stage list from ``ppo.iterations`` itself (``foreach`` takes a list or a
mapping, and interpolation has no arithmetic), so these files are generated: by
``python -m minichatgpt.pipeline.iterations``, by ``python -m minichatgpt.params``, and by the
``check_params`` stage when params.yaml asks for another count (it then stops the run: DVC read
the dvc.yaml files before the first stage ran).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

BLOCK = 10
"""iterations per dvc.yaml: a stage rewrites a lock of at most 4 * BLOCK entries"""
DIR = "iterations"
TEMPLATE = f"{DIR}/stages.yaml"
HEADER = """\
# PPO iterations {first}-{last}: written by `python -m minichatgpt.pipeline.iterations` from {template}
# and ppo.iterations in params.yaml ({block} iterations per file). Edit the template, not this file.
vars:
  - ../../params.yaml:runtime
  - iters:
"""


def block_ranges(n: int) -> list[tuple[int, int]]:
    """(first, last) of each block holding iterations 1..n; block b always covers b*BLOCK+1..(b+1)*BLOCK."""
    return [(first, min(first + BLOCK - 1, n)) for first in range(1, n + 1, BLOCK)]


def block_dir(first: int) -> str:
    return f"{DIR}/{first:04d}-{first + BLOCK - 1:04d}"


def stage_address(name: str, i: int) -> str:
    """DVC's address of an iteration stage, ``iterations/0001-0010/dvc.yaml:update@3``: a plain
    ``update@3`` is not found, as the stage is not in the top-level dvc.yaml."""
    return f"{block_dir((i - 1) // BLOCK * BLOCK + 1)}/dvc.yaml:{name}@{i}"


def stage_name(address: str) -> str:
    """The inverse: ``update@3`` for ``iterations/0001-0010/dvc.yaml:update@3`` (a top-level stage's is its address)."""
    return address.rsplit("dvc.yaml:", 1)[-1]


def render(template: str, first: int, last: int) -> str:
    """One block's dvc.yaml: its iterations (each naming the one it continues from), then the template."""
    lines = [HEADER.format(first=first, last=last, template=TEMPLATE, block=BLOCK)]
    lines += [f"      '{i}':\n        prev: '{i - 1}'\n" for i in range(first, last + 1)]
    return "".join(lines) + template


def expected(root: Path, n: int) -> dict[str, str]:
    """Relative path -> text of every block file a run of ``n`` iterations needs."""
    template = (root / TEMPLATE).read_text()
    return {f"{block_dir(first)}/dvc.yaml": render(template, first, last) for first, last in block_ranges(n)}


def stale(root: Path, n: int, want: dict[str, str] | None = None) -> list[str]:
    """Block files that differ from what ``n`` iterations need (``want``: :func:`expected`, if
    computed already), are missing, or are left over."""
    want = expected(root, n) if want is None else want
    have = {str(p.relative_to(root)) for p in (root / DIR).glob("*/dvc.yaml")}
    wrong = [path for path, text in want.items() if not (root / path).is_file() or (root / path).read_text() != text]
    return sorted(wrong + sorted(have - set(want)))


def write(root: Path, n: int) -> list[str]:
    """Make the block files those of ``n`` iterations; returns what changed. Each file is replaced
    atomically; a block no longer needed goes with its dvc.lock (its outputs stay in the workspace)."""
    want = expected(root, n)
    changed = stale(root, n, want)
    for path in changed:
        target = root / path
        if path in want:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            tmp.write_text(want[path])
            os.replace(tmp, target)
        else:
            for name in ("dvc.yaml", "dvc.lock", ".gitignore"):
                (target.parent / name).unlink(missing_ok=True)
            if not any(target.parent.iterdir()):
                shutil.rmtree(target.parent)
    return changed


def lock_files(root: Path) -> list[Path]:
    """The blocks' dvc.lock files, in iteration order."""
    return sorted((root / DIR).glob("*/dvc.lock"))


def main(argv: list[str] | None = None) -> None:
    """``python -m minichatgpt.pipeline.iterations [--params params.yaml]``: write the block files
    that ppo.iterations in params.yaml asks for."""
    import argparse
    import sys

    from minichatgpt.params import ParamsError, load_yaml, section

    p = argparse.ArgumentParser(prog="python -m minichatgpt.pipeline.iterations", description=main.__doc__)
    p.add_argument("--params", default="params.yaml")
    args = p.parse_args(argv)
    try:
        n = section(load_yaml(args.params), "ppo").iterations
        changed = write(Path(args.params).resolve().parent, n)
    except (OSError, ParamsError) as err:
        sys.exit(f"{args.params}: {err}")
    print(f"ppo.iterations={n}: {len(block_ranges(n))} block files, " + (
        f"wrote {', '.join(changed)}" if changed else "all up to date"))


if __name__ == "__main__":
    main()
