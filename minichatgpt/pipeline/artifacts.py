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
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

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
# per-token columns that must have one entry per response token
PER_TOKEN = ("logprobs", "values", "ref_logprobs", "kl", "rewards", "advantages", "returns")


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; move it onto ``final`` only if the block succeeds.

    Works for files and directories. The temporary name starts with ``.tmp-`` so a
    crash leaves at most a hidden leftover, never a finished-looking output.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}"
    _remove(tmp)
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.is_dir() and not final.is_symlink():
            _remove(final)  # a directory cannot be replaced in one step; a file can
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        _remove(tmp)


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
