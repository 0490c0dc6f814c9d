"""Parquet artifacts: declared schemas, validated reads, atomic writes.

Every stage output goes through :func:`atomic_path`, so a stage killed at any
moment leaves either the previous state or the complete file, never a partial
artifact that DVC could cache. Readers check the schema and name the file,
column, expected and found types on mismatch.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from minichatgpt.runtime.host import pid_alive

INT_LIST = pa.list_(pa.int32())
FLOAT_LIST = pa.list_(pa.float32())


class ArtifactError(ValueError):
    """An input artifact is missing or does not match its declared schema."""


SCHEMAS: dict[str, pa.Schema] = {
    "corpus": pa.schema([("text", pa.string()), ("label", pa.int8()), ("split", pa.string())]),
    "prompts": pa.schema([
        ("prompt_id", pa.int64()), ("split", pa.string()), ("text", pa.string()),
        ("query_len", pa.int32()), ("label", pa.int8()),
    ]),
    "rollouts": pa.schema([
        ("prompt_id", pa.int64()), ("query_ids", INT_LIST), ("response_ids", INT_LIST),
        ("query", pa.string()), ("response", pa.string()), ("logprobs", FLOAT_LIST), ("values", FLOAT_LIST),
    ]),
}
SCHEMAS["scored"] = pa.schema(list(SCHEMAS["rollouts"]) + [
    pa.field("score", pa.float32()), pa.field("ref_logprobs", FLOAT_LIST), pa.field("kl", FLOAT_LIST),
    pa.field("rewards", FLOAT_LIST), pa.field("kl_coef", pa.float32()),
])
SCHEMAS["advantages"] = pa.schema(list(SCHEMAS["scored"]) + [
    pa.field("advantages", FLOAT_LIST), pa.field("returns", FLOAT_LIST),
])
TMP_PREFIX = ".tmp-"
"""Hidden names of staging directories (ignored by git and DVC; never a finished-looking output)."""
CHECKSUMS = "SHA256SUMS"
"""Manifest of a directory output, in ``sha256sum`` format (``sha256sum -c SHA256SUMS`` checks it too)."""
# per-token columns that must have one entry per response token
PER_TOKEN = ("logprobs", "values", "ref_logprobs", "kl", "rewards", "advantages", "returns")


commit_guards: list[Callable[[], None]] = []
"""Checks run before any output is swapped into place; one that raises leaves the previous state.
A stage registers one that the code it runs is still the code on disk (``runtime.stage``)."""


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; move it onto ``final`` only if the block succeeds.

    Works for files and directories. Each writer stages under its own hidden name
    (``.tmp-<name>-<pid>-<random>``), so two writers of one output (a stage orphaned by a
    killed ``dvc`` and its rerun) never write into or delete each other's files. The final
    swap happens under a lock on the output, so each result lands whole and the last one
    wins. A directory output gets a ``SHA256SUMS`` manifest that readers check
    (:func:`verify_checksums`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-{os.getpid()}-", dir=final.parent))
    staged = work / final.name
    try:
        yield staged
        if staged.is_dir() and not staged.is_symlink():
            write_checksums(staged)
        _fsync_tree(staged)
        for guard in commit_guards:
            guard()
        with output_lock(final):
            _remove_orphans(final)
            if final.is_dir() and not final.is_symlink():
                os.replace(final, work / ".replaced")  # a directory cannot be replaced in one step; a file can
            os.replace(staged, final)
            _fsync_dir(final.parent)
    finally:
        _remove(work)


@contextlib.contextmanager
def output_lock(final: Path) -> Iterator[None]:
    """Exclusive lock for swapping ``final`` into place: a ``flock`` on its parent directory,
    so no lock file is left beside the outputs (the swap takes milliseconds)."""
    import fcntl

    fd = os.open(final.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_orphans(final: Path) -> None:
    """Staging directories of this output left by writers that no longer exist (killed mid-write)."""
    prefix = f"{TMP_PREFIX}{final.name}-"
    for entry in final.parent.glob(f"{TMP_PREFIX}*"):
        rest = entry.name[len(prefix):]
        if not entry.name.startswith(prefix) or not entry.is_dir() or "-" not in rest:
            continue
        pid = rest.split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            _remove(entry)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_tree(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_table(table: pa.Table, path: str | Path, kind: str | None = None) -> None:
    """Validate ``table`` against the schema of ``kind`` and write it atomically."""
    if kind is not None:
        table = conform(table, kind, str(path))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def conform(table: pa.Table, kind: str, where: str) -> pa.Table:
    """Select and order the declared columns, refusing missing or mistyped ones."""
    schema = SCHEMAS[kind]
    for fld in schema:
        if fld.name not in table.column_names:
            raise ArtifactError(f"{where}: missing column {fld.name!r} ({kind} artifact, expected {fld.type})")
        found = table.schema.field(fld.name).type
        if found != fld.type:
            raise ArtifactError(f"{where}: column {fld.name!r} has type {found}, expected {fld.type}")
        if table[fld.name].null_count:
            row = table[fld.name].is_null().to_pylist().index(True)
            raise ArtifactError(f"{where}: row {row}: column {fld.name!r} is null")
    table = table.select(schema.names)
    _check_lengths(table, where)
    return table


def _check_lengths(table: pa.Table, where: str) -> None:
    if "response_ids" not in table.column_names or table.num_rows == 0:
        return
    import pyarrow.compute as pc

    expected = pc.list_value_length(table["response_ids"])
    if pc.any(pc.equal(expected, 0)).as_py():
        row = pc.index(pc.equal(expected, 0), True).as_py()
        raise ArtifactError(f"{where}: row {row} has an empty response_ids")
    for name in PER_TOKEN:
        if name in table.column_names:
            bad = pc.not_equal(pc.list_value_length(table[name]), expected)
            if pc.any(bad).as_py():
                row = pc.index(bad, True).as_py()
                raise ArtifactError(f"{where}: row {row}: column {name!r} length differs from response_ids")


def read_table(path: str | Path, kind: str) -> pa.Table:
    """Read a Parquet artifact and check it against the schema of ``kind``."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found (expected a {kind} artifact; run the stage that writes it)")
    try:
        # one file, read on this thread: pq.read_table goes through pyarrow.dataset and starts
        # Arrow's thread pool, which costs more than it saves for tables of this size
        table = pq.ParquetFile(path).read(use_threads=False)
    except (pa.ArrowInvalid, OSError) as err:
        raise ArtifactError(f"{path}: not a readable Parquet file: {err}") from None
    table = conform(table, kind, str(path))
    if table.num_rows == 0:
        raise ArtifactError(f"{path}: has no rows")
    return table


def write_json(obj: object, path: str | Path) -> None:
    import json

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _sha256(path: Path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_checksums(directory: Path) -> None:
    """Record the sha256 of every file of a directory output in its ``SHA256SUMS``."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    lines = [f"{_sha256(p)}  {p.relative_to(directory).as_posix()}\n" for p in files]
    (directory / CHECKSUMS).write_text("".join(lines))


_verified: dict[str, tuple] = {}
"""directories verified by this process, with the stat of their files then (checked once, not per load)"""


def verify_checksums(directory: str | Path) -> None:
    """Refuse a directory whose files differ from its ``SHA256SUMS`` (truncated, altered, or a
    corrupted cache object restored by ``dvc checkout``), naming the file. A directory without
    a manifest (a model downloaded or saved elsewhere) is not checked."""
    directory = Path(directory)
    manifest = directory / CHECKSUMS
    if not manifest.is_file():
        return
    entries = []
    for number, line in enumerate(manifest.read_text().splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name or ".." in Path(name).parts or Path(name).is_absolute():
            raise ArtifactError(f"{manifest}: line {number} is not '<sha256>  <file>'")
        entries.append((directory / name, digest))
    try:
        stats = tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in (os.stat(f) for f, _ in entries))
    except FileNotFoundError as err:
        raise ArtifactError(f"{err.filename}: missing, but listed in {manifest}") from None
    key = str(directory.resolve())
    if _verified.get(key) == stats:
        return
    for file, digest in entries:
        if _sha256(file) != digest:
            raise ArtifactError(f"{file}: contents differ from the sha256 recorded in {manifest} (truncated or "
                                "altered); rerun the stage that writes it, e.g. `dvc repro --force <stage>`")
    _verified[key] = stats
