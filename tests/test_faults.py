"""Fault injection: bad inputs are refused by name without touching anything, and a
`dvc repro` killed with SIGKILL anywhere finishes on a plain rerun with the same hashes."""

from __future__ import annotations

import hashlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import (
    TINY_PARAMS,
    lock_files,
    make_pipeline_repo,
    out_hashes,
    sh,
    stages_run,
    tool_env,
    write_params,
)

pytestmark = pytest.mark.e2e

# the commands dvc.yaml runs for these stages (iteration 1)
COMMANDS = {
    "prepare": ["--corpus", "data/corpus.parquet", "--prompts", "data/prompts.parquet"],
    "pretrain": ["--corpus", "data/corpus.parquet", "--out", "checkpoints/0", "--metrics", "metrics/pretrain.json"],
    "rollout": ["--iter", "1", "--policy", "checkpoints/0", "--prompts", "data/prompts.parquet",
                "--out", "runs/rollouts/1.parquet"],
    "score": ["--iter", "1", "--rollouts", "runs/rollouts/1.parquet", "--reference", "checkpoints/0",
              "--policy", "checkpoints/0", "--reward", "models/reward", "--out", "runs/scored/1.parquet"],
    "advantages": ["--iter", "1", "--scored", "runs/scored/1.parquet", "--out", "runs/advantages/1.parquet"],
    "update": ["--iter", "1", "--policy", "checkpoints/0", "--advantages", "runs/advantages/1.parquet",
               "--out", "checkpoints/1", "--metrics", "metrics/iters/1.json"],
    "evaluate": ["--summary", "metrics/summary.json", "--samples", "metrics/samples.json"],
}


def snapshot(repo: Path) -> dict[str, str]:
    """Hash of every file DVC tracks or writes, and of dvc.lock."""
    files = [repo / f for f in lock_files(repo)] + [p for d in ("data", "runs", "checkpoints", "models", "metrics")
                                   for p in sorted((repo / d).rglob("*")) if p.is_file()]
    return {str(p.relative_to(repo)): hashlib.md5(p.read_bytes()).hexdigest() for p in files}


def set_param(params: dict, dotted: str, value) -> dict:
    section, key = dotted.split(".", 1)
    params = yaml.safe_load(yaml.safe_dump(params))
    if key == "*":
        params[section] = value
    else:
        params.setdefault(section, {})[key] = value
    return params


def corrupt_scored(repo: Path, change: Callable[[pa.Table], pa.Table]) -> str:
    table = change(pq.read_table(repo / "runs/scored/1.parquet"))
    path = repo / "bad" / "scored.parquet"
    path.parent.mkdir(exist_ok=True)
    pq.write_table(table, path)
    return "bad/scored.parquet"


def nan_rewards(t: pa.Table) -> pa.Table:
    rows = t["rewards"].to_pylist()
    rows[3][0] = float("nan")
    return t.set_column(t.schema.get_field_index("rewards"), "rewards", pa.array(rows, pa.list_(pa.float32())))


PARAM_CASES = [  # (stage, dotted param, bad value, text the one-line error must contain)
    ("advantages", "ppo.lam", 1.5, "ppo.lam=1.5"),
    ("advantages", "ppo.gamma", -0.1, "ppo.gamma=-0.1"),
    ("advantages", "ppo.lamb", 0.9, "did you mean ppo.lam"),
    ("update", "ppo.cliprange", 0.0, "ppo.cliprange=0.0"),
    ("update", "ppo.ppo_epochs", 0, "ppo.ppo_epochs=0"),
    ("update", "ppo.mini_batch_size", 3, "ppo.batch_size=8"),
    ("update", "ppo.learning_rate", "fast", "ppo.learning_rate='fast'"),
    ("update", "ppo.adap_kl_ctrl", 3, "ppo.adap_kl_ctrl=3"),
    ("update", "ppo.gradient_accumulation_steps", 3, "ppo.mini_batch_size=4"),
    ("score", "ppo.kl_penalty", "kl2", "ppo.kl_penalty='kl2'"),
    ("score", "ppo.score_clip", -1.0, "ppo.score_clip=-1.0"),
    ("rollout", "generation.output_max_length", 2, "generation.output_max_length=2"),
    ("rollout", "generation.top_p", 0.0, "generation.top_p=0.0"),
    ("rollout", "runtime.thread", 2, "did you mean runtime.threads"),
    ("prepare", "data.input_max_text_length", 1, "data.input_max_text_length=1"),
    ("prepare", "data.eval_prompts", 1, "data.eval_prompts=1"),
    ("pretrain", "pretrain.n_embd", 31, "pretrain.n_embd=31"),
    ("pretrain", "pretrain.block_size", 128, "pretrain.block_size=128"),
    ("evaluate", "ppo.iterations", 0, "ppo.iterations=0"),
    ("evaluate", "iters.*", {"1": {"prev": "0"}}, "replaced by ppo.iterations"),
    ("advantages", "ppo_settings.*", {"lam": 0.9}, "unknown section ppo_settings"),
]

ARTIFACT_CASES = [  # (stage, argument to replace, bad input builder, text the error must contain)
    ("advantages", "--scored", lambda r: corrupt_scored(r, lambda t: t.drop_columns(["values"])), "'values'"),
    ("advantages", "--scored", lambda r: corrupt_scored(
        r, lambda t: t.set_column(t.schema.get_field_index("score"), "score", pa.array(["x"] * t.num_rows))),
     "'score' has type string"),
    ("advantages", "--scored", lambda r: corrupt_scored(r, nan_rewards), "non-finite rewards in sample 3"),
    ("advantages", "--scored", lambda r: corrupt_scored(r, lambda t: t.slice(0, 0)), "has no rows"),
    ("advantages", "--scored", lambda r: (r / "dvc.yaml").name, "not a readable Parquet file"),
    ("score", "--policy", lambda r: "models", "models/state.json: missing"),
    ("rollout", "--prompts", lambda r: "data/missing.parquet", "data/missing.parquet: file not found"),
]


def run_stage(repo: Path, stage: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"stages/{stage}.py", *args], cwd=repo, env=tool_env(),
                          capture_output=True, text=True, timeout=120)


def assert_refused(repo: Path, stage: str, args: list[str], needle: str, before: dict[str, str]) -> None:
    proc = run_stage(repo, stage, args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines and lines[-1].startswith(f"stage {stage}: ") and needle in lines[-1], proc.stderr
    assert snapshot(repo) == before, "a refused input changed an output or dvc.lock"
    assert not list(repo.rglob(".tmp-*"))


@pytest.mark.parametrize(("stage", "dotted", "value", "needle"), PARAM_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in PARAM_CASES])
def test_bad_params_are_refused_by_name(pipeline_repo: Path, stage, dotted, value, needle) -> None:
    before = snapshot(pipeline_repo)
    original = (pipeline_repo / "params.yaml").read_text()
    try:
        write_params(pipeline_repo / "params.yaml", set_param(yaml.safe_load(original), dotted, value))
        assert_refused(pipeline_repo, stage, COMMANDS[stage], needle, before)
    finally:
        (pipeline_repo / "params.yaml").write_text(original)


@pytest.mark.parametrize(("stage", "flag", "build", "needle"), ARTIFACT_CASES,
                         ids=[f"{c[0]}-{c[3][:24]}" for c in ARTIFACT_CASES])
def test_bad_artifacts_are_refused_by_name(pipeline_repo: Path, stage, flag, build, needle) -> None:
    bad = build(pipeline_repo)
    before = snapshot(pipeline_repo)
    args = list(COMMANDS[stage])
    args[args.index(flag) + 1] = bad
    try:
        assert_refused(pipeline_repo, stage, args, needle, before)
    finally:
        for leftover in (pipeline_repo / "bad").glob("*"):
            leftover.unlink()


def repro_killed_in(repo: Path, stage: str, delay: float) -> bool:
    """Start `dvc repro`, SIGKILL its whole process group ``delay`` s after ``stage`` starts,
    or as soon as the stage reports it is done (outputs written, dvc.lock not yet updated)
    if that comes first, so that a fast stage cannot let the run go on past it."""
    env = tool_env() | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()
    deadline = None
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            break  # the delay is over
        if line is None:
            break  # the run ended
        if deadline is None and stage in stages_run(line):
            deadline = time.monotonic() + delay
        elif deadline is not None and "] done in " in line:
            break  # the stage finished first: kill before DVC records it
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the whole run finished
        pass
    proc.wait()
    return proc.returncode == -signal.SIGKILL


# delays (s) after the stage starts; stages spend their first seconds importing torch and
# transformers (less with the warm worker), so longer delays land in compute or writes
KILL_POINTS = [("prepare", 1.0), ("pretrain", 4.0), ("train_reward", 3.0), ("rollout@1", 2.5),
               ("score@1", 3.0), ("advantages@1", 0.8), ("update@1", 4.0), ("update@2", 3.5), ("evaluate", 2.0)]


def test_sigkill_anywhere_then_plain_repro_gives_the_uninterrupted_hashes(pipeline_repo: Path, tmp_path) -> None:
    uninterrupted = out_hashes(pipeline_repo, "HEAD")
    repo = make_pipeline_repo(tmp_path / "killed", TINY_PARAMS)
    killed = [stage for stage, delay in KILL_POINTS if repro_killed_in(repo, stage, delay)]
    assert len(killed) >= 6, f"only killed in {killed}"
    final = sh(["dvc", "repro"], repo)
    if "evaluate" in killed:  # the last kill left work for the plain rerun
        assert "Running stage 'evaluate'" in final.stdout
    assert out_hashes(repo) == uninterrupted
    assert "up to date" in sh(["dvc", "status"], repo).stdout
