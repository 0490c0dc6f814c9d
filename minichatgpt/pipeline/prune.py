"""Shrink a finished run to what lengthening it needs: ``python -m minichatgpt.pipeline.prune``.

Every iteration leaves its rollouts, scores, advantages and a checkpoint with Adam state in the
workspace and the DVC cache (README: about 17.5 MB per iteration for the default policy, 1.6 GB for
a 135M one trained in full). ``dvc gc --workspace`` cannot drop them: every one is named by a
dvc.lock. Lengthening a run needs the stages' records (the dvc.lock files, kept as they are), the
last checkpoint and the per-iteration metrics that ``evaluate`` collects; ``dvc repro
--allow-missing`` (or ``dvc exp run --allow-missing``) then skips the stages whose outputs are gone
but which are otherwise unchanged, and runs only the new iterations.

So this removes every other iteration output from the workspace and, the way ``dvc gc
--workspace`` does, every object in the local cache that the remaining outputs do not use (other
experiments' too). It refuses a run that is not up to date: that run still needs its inputs.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

ITERATION_STAGE = re.compile(r"^(rollout|score|advantages|update)@(\d+)$")


class PruneError(Exception):
    """The run cannot be pruned as it stands; nothing was removed."""


@dataclass
class Plan:
    last: int
    drop: list = field(default_factory=list)
    """outputs (DVC ``Output``) whose workspace copy and cache objects go"""
    keep: list = field(default_factory=list)


def plan(stages: list, keep_checkpoints: set[int]) -> Plan:
    """Split the pipeline's outputs: of the iteration stages, only the last checkpoint (and those
    in ``keep_checkpoints``) and the per-iteration metrics stay; other stages' outputs all stay."""
    iteration = {s: int(m.group(2)) for s in stages if (m := ITERATION_STAGE.match(s.name or ""))}
    updates = [i for s, i in iteration.items() if s.name.startswith("update@")]
    if not updates:
        raise PruneError("no iteration stages in this pipeline: nothing to prune")
    result = Plan(last=max(updates))
    for stage in stages:
        for out in stage.outs:
            i = iteration.get(stage)
            needed = i is None or (stage.name.startswith("update@") and (
                not out.is_dir_checksum and str(out.def_path).startswith("metrics/")
                or i == result.last or i in keep_checkpoints))
            (result.keep if needed else result.drop).append(out)
    return result


def used_objects(outs: list) -> set:
    """The cache objects (``HashInfo``) ``outs`` need: a directory's listing and every file in it."""
    used: set = set()
    for out in outs:
        for ids in out.get_used_objs().values():
            used |= ids
    return used


def prune(root: Path, keep_checkpoints: set[int] = frozenset(), dry_run: bool = False) -> dict:
    """Remove what lengthening the run in ``root`` does not need; returns what went (or would go)."""
    from dvc.repo import Repo, lock_repo
    from dvc_data.hashfile.gc import gc

    with Repo(str(root)) as repo, lock_repo(repo):
        stages = list(repo.index.stages)
        changed = [s.addressing for s in stages if s.changed(allow_missing=True)]
        if changed:
            more = f", and {len(changed) - 5} more" if len(changed) > 5 else ""
            raise PruneError(f"the pipeline is not up to date (changed: {', '.join(changed[:5])}{more}): "
                             "finish the run with `dvc repro` before pruning it; nothing was removed")
        todo = plan(stages, set(keep_checkpoints))
        used = used_objects(todo.keep)
        workspace = [Path(out.fs_path) for out in todo.drop if out.exists]
        removed_bytes = sum(_size(p) for p in workspace)
        objects = 0
        for odb in {id(odb): odb for _, odb in repo.cache.by_scheme() if odb}.values():
            needed = {u.value for u in used if u.name == odb.hash_name}
            unused = [h for h in odb.all() if h not in needed]
            objects += len(unused)
            removed_bytes += sum(_size(Path(odb.oid_to_path(h))) for h in unused)
            if not dry_run:
                gc(odb, used)
        if not dry_run:
            for out, path in ((o, Path(o.fs_path)) for o in todo.drop):
                if path.exists() or path.is_symlink():
                    out.fs.remove(out.fs_path, recursive=True)
        return {"last": todo.last, "outputs": [str(o) for o in todo.drop], "workspace_paths": len(workspace),
                "cache_objects": objects, "bytes": removed_bytes}


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size if path.exists() else 0


def main(argv: list[str] | None = None) -> None:
    """``python -m minichatgpt.pipeline.prune [--keep 50,100] [--dry-run]``: keep only what
    lengthening the finished run in the current directory needs."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m minichatgpt.pipeline.prune", description=main.__doc__)
    p.add_argument("--keep", default="", help="also keep these iterations' checkpoints (comma-separated)")
    p.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    p.add_argument("--root", default=".", help="the repository (default: here)")
    args = p.parse_args(argv)
    try:
        keep = {int(i) for i in args.keep.split(",") if i.strip()}
    except ValueError:
        sys.exit(f"--keep: expected iteration numbers separated by commas, got {args.keep!r}")
    try:
        done = prune(Path(args.root), keep, args.dry_run)
    except PruneError as err:
        sys.exit(f"prune: {err}")
    verb = "would remove" if args.dry_run else "removed"
    print(f"run of {done['last']} iterations: {verb} {len(done['outputs'])} iteration outputs "
          f"({done['workspace_paths']} in the workspace) and {done['cache_objects']} cached objects, "
          f"{done['bytes'] / 1e6:.1f} MB; lengthen it with `dvc repro --allow-missing`")


if __name__ == "__main__":
    main()
