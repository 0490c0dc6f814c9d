"""Parquet artifacts: schema checks on write and read, per-token lengths, atomic writes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minichatgpt.pipeline.artifacts import (
    FLOAT_LIST,
    INT_LIST,
    SCHEMAS,
    ArtifactError,
    atomic_path,
    read_table,
    verify_checksums,
    write_json,
    write_table,
)


def rollouts(**overrides) -> pa.Table:
    cols = {
        "prompt_id": pa.array([0, 7], pa.int64()),
        "query_ids": pa.array([[1, 2], [3]], INT_LIST),
        "response_ids": pa.array([[4, 5, 6], [7]], INT_LIST),
        "query": pa.array(["good", "bad"]),
        "response": pa.array([" movie!", " film"]),
        "logprobs": pa.array([[-0.5, -1.25, -2.0], [-0.75]], FLOAT_LIST),
        "values": pa.array([[0.5, 0.25, 0.0], [1.5]], FLOAT_LIST),
    }
    cols.update(overrides)
    return pa.table(cols)


def test_round_trip(tmp_path):
    path = tmp_path / "out" / "rollouts.parquet"
    table = rollouts()
    write_table(table, path, "rollouts")
    back = read_table(path, "rollouts")
    assert back.schema == SCHEMAS["rollouts"]
    assert back.to_pylist() == table.to_pylist()
    assert back.column("logprobs").to_pylist() == [[-0.5, -1.25, -2.0], [-0.75]]
    assert sorted(p.name for p in path.parent.iterdir()) == ["rollouts.parquet"]


def test_write_selects_and_orders_declared_columns(tmp_path):
    path = tmp_path / "rollouts.parquet"
    table = rollouts(extra=pa.array([1, 2]))
    shuffled = table.select(list(reversed(table.column_names)))
    write_table(shuffled, path, "rollouts")
    stored = pq.read_table(path)
    assert stored.column_names == SCHEMAS["rollouts"].names
    assert stored.to_pylist() == rollouts().to_pylist()


def test_write_missing_column_names_file_and_column(tmp_path):
    path = tmp_path / "rollouts.parquet"
    with pytest.raises(ArtifactError) as err:
        write_table(rollouts().drop_columns(["values"]), path, "rollouts")
    assert str(path) in str(err.value) and "'values'" in str(err.value) and "missing column" in str(err.value)
    assert not path.exists()


def test_read_missing_column_names_file_and_column(tmp_path):
    path = tmp_path / "rollouts.parquet"
    pq.write_table(rollouts().drop_columns(["response"]), path)
    with pytest.raises(ArtifactError) as err:
        read_table(path, "rollouts")
    assert str(path) in str(err.value) and "'response'" in str(err.value)


def test_wrong_type_names_file_column_and_types(tmp_path):
    path = tmp_path / "rollouts.parquet"
    pq.write_table(rollouts(prompt_id=pa.array([0, 7], pa.int32())), path)
    with pytest.raises(ArtifactError) as err:
        read_table(path, "rollouts")
    msg = str(err.value)
    assert str(path) in msg and "'prompt_id'" in msg and "int32" in msg and "int64" in msg


def test_wrong_list_item_type_refused_on_write(tmp_path):
    path = tmp_path / "rollouts.parquet"
    bad = pa.array([[-0.5, -1.25, -2.0], [-0.75]], pa.list_(pa.float64()))
    with pytest.raises(ArtifactError) as err:
        write_table(rollouts(logprobs=bad), path, "rollouts")
    assert str(path) in str(err.value) and "'logprobs'" in str(err.value) and "double" in str(err.value)
    assert not path.exists()


@pytest.mark.parametrize("column", ["logprobs", "values"])
def test_per_token_length_mismatch_names_row_and_column(tmp_path, column):
    path = tmp_path / "rollouts.parquet"
    bad = pa.array([[0.0, 0.0, 0.0], [0.0, 0.0]], FLOAT_LIST)  # row 1 has 2 entries for 1 token
    with pytest.raises(ArtifactError) as err:
        write_table(rollouts(**{column: bad}), path, "rollouts")
    msg = str(err.value)
    assert str(path) in msg and "row 1" in msg and f"'{column}'" in msg
    pq.write_table(rollouts(**{column: bad}), path)
    with pytest.raises(ArtifactError, match=f"row 1: column '{column}'"):
        read_table(path, "rollouts")


def test_empty_response_refused(tmp_path):
    table = rollouts(
        response_ids=pa.array([[4, 5, 6], []], INT_LIST), logprobs=pa.array([[0.0] * 3, []], FLOAT_LIST),
        values=pa.array([[0.0] * 3, []], FLOAT_LIST),
    )
    with pytest.raises(ArtifactError, match="row 1 has an empty response_ids"):
        write_table(table, tmp_path / "r.parquet", "rollouts")


def test_scored_per_token_columns_checked(tmp_path):
    extra = {
        "score": pa.array([1.0, -1.0], pa.float32()),
        "ref_logprobs": pa.array([[0.0] * 3, [0.0]], FLOAT_LIST),
        "kl": pa.array([[0.0] * 3, [0.0, 0.0]], FLOAT_LIST),
        "rewards": pa.array([[0.0] * 3, [0.0]], FLOAT_LIST),
        "kl_coef": pa.array([0.2, 0.2], pa.float32()),
    }
    with pytest.raises(ArtifactError, match="row 1: column 'kl'"):
        write_table(rollouts(**extra), tmp_path / "s.parquet", "scored")
    extra["kl"] = pa.array([[0.0] * 3, [0.0]], FLOAT_LIST)
    write_table(rollouts(**extra), tmp_path / "s.parquet", "scored")
    assert read_table(tmp_path / "s.parquet", "scored").num_rows == 2


def test_non_parquet_file(tmp_path):
    path = tmp_path / "rollouts.parquet"
    path.write_text("this is not parquet\n")
    with pytest.raises(ArtifactError) as err:
        read_table(path, "rollouts")
    assert str(path) in str(err.value) and "Parquet" in str(err.value)


def test_missing_file(tmp_path):
    path = tmp_path / "absent.parquet"
    with pytest.raises(ArtifactError) as err:
        read_table(path, "rollouts")
    assert str(path) in str(err.value) and "not found" in str(err.value)


def test_no_rows(tmp_path):
    path = tmp_path / "rollouts.parquet"
    write_table(SCHEMAS["rollouts"].empty_table(), path, "rollouts")
    with pytest.raises(ArtifactError, match="has no rows"):
        read_table(path, "rollouts")


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_atomic_path_failure_keeps_previous_file(tmp_path):
    final = tmp_path / "metrics.json"
    final.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(final) as tmp:
            assert tmp != final and tmp.parent.parent == final.parent and tmp.parent.name.startswith(".tmp-")
            tmp.write_text("new, half written")
            raise RuntimeError("boom")
    assert final.read_text() == "old"
    assert listing(tmp_path) == ["metrics.json"]


def test_atomic_path_failure_without_previous_file(tmp_path):
    final = tmp_path / "sub" / "model"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.mkdir()
            (tmp / "weights.bin").write_bytes(b"x")
            raise RuntimeError("killed")
    assert not final.exists()
    assert listing(final.parent) == []


def test_atomic_path_success_replaces(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.bin").write_bytes(b"old")
    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "new.bin").write_bytes(b"new")
        assert listing(final) == ["old.bin"]  # nothing visible until the block ends
    assert listing(final) == ["SHA256SUMS", "new.bin"]
    assert (final / "SHA256SUMS").read_text() == f"{hashlib.sha256(b'new').hexdigest()}  new.bin\n"
    assert listing(tmp_path) == ["model"]


def test_atomic_path_removes_the_staging_dirs_of_dead_writers_only(tmp_path):
    final = tmp_path / "a.json"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".tmp-a.json-{int(dead.stdout)}-x1"  # a writer killed mid-write left this
    (orphan / "a.json").mkdir(parents=True)
    (orphan / "a.json" / "part").write_text("stale")
    live = tmp_path / f".tmp-a.json-{os.getppid()}-x2"  # a writer that is still running
    live.mkdir()
    write_json({"b": 1, "a": [1.5]}, final)
    assert final.read_text() == '{\n  "a": [\n    1.5\n  ],\n  "b": 1\n}\n'
    assert listing(tmp_path) == [live.name, "a.json"]


WRITER = """
import sys, time
from pathlib import Path
from minichatgpt.pipeline.artifacts import atomic_path
final, name, rounds, pause = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
for r in range(rounds):
    with atomic_path(final) as tmp:
        tmp.mkdir()
        for part in range(8):
            (tmp / f"part{part}").write_text(f"{name} {r}")
            time.sleep(pause)
print("done", flush=True)
"""


def read_dir(path: Path) -> dict[str, str]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        parts = {}
        for name in sorted(os.listdir(fd)):
            if name.startswith("part"):
                f = os.open(name, os.O_RDONLY, dir_fd=fd)
                with os.fdopen(f) as stream:
                    parts[name] = stream.read()
        return parts
    finally:
        os.close(fd)


def test_two_writers_of_one_output_never_delete_or_mix_each_others_files(tmp_path):
    """An orphaned stage and its rerun writing the same checkpoint at once: every result lands
    whole (all parts from one writer and round, with a matching manifest), none is lost."""
    final = tmp_path / "checkpoint"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(final), name, "12", pause],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, pause in (("orphan", "0.002"), ("rerun", "0.003"))]
    seen = set()
    while any(w.poll() is None for w in writers):
        try:  # read one directory (inode) throughout, as a loader holding it open would
            parts = read_dir(final)
        except (FileNotFoundError, NotADirectoryError):
            continue  # between the two renames of a swap
        if parts:
            assert len(parts) == 8 and len(set(parts.values())) == 1, parts  # never a mix
            seen.add(next(iter(parts.values())))
    for w in writers:
        out, err = w.communicate()
        assert w.returncode == 0 and out == "done\n", err  # neither lost its output to the other
    verify_checksums(final)
    last = (final / "part0").read_text()
    assert {p.read_text() for p in final.glob("part*")} == {last} and last.endswith(" 11")
    assert listing(tmp_path) == ["checkpoint"]  # no staging directory left behind
    assert len({s.split()[0] for s in seen}) == 2  # both writers' results were in place at some point


def test_a_truncated_or_altered_file_is_refused_naming_it(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_path(final) as tmp:
        (tmp / "sub").mkdir(parents=True)
        (tmp / "model.safetensors").write_bytes(b"w" * 1000)
        (tmp / "sub" / "state.json").write_text("{}")
    verify_checksums(final)
    (final / "model.safetensors").write_bytes(b"w" * 999)  # truncated
    with pytest.raises(ArtifactError, match=r"ckpt/model\.safetensors: contents differ from the sha256"):
        verify_checksums(final)
    (final / "model.safetensors").write_bytes(b"w" * 1000)
    verify_checksums(final)
    (final / "sub" / "state.json").write_text("[]")  # altered, same size
    with pytest.raises(ArtifactError, match=r"ckpt/sub/state\.json: contents differ"):
        verify_checksums(final)
    (final / "sub" / "state.json").unlink()
    with pytest.raises(ArtifactError, match=r"state\.json: missing, but listed in .*SHA256SUMS"):
        verify_checksums(final)
    verify_checksums(tmp_path)  # a directory without a manifest (a model saved elsewhere) is not checked
