"""Shared pieces of the benchmark harness: the TRL virtualenv, the default models,
the workload (same prompts and lengths for every contender) and scratch DVC copies.

Runs in the project's .venv; the TRL side runs in ``benchmarks/_work/trl-venv``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "_work"
TRL_VENV = WORK / "trl-venv"
TRL_PACKAGES = ["trl==0.11.4", "transformers==4.45.2", "accelerate==0.34.2", "rich"]
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(cmd: list[str], cwd: Path = ROOT, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, check=True, **kw)


def trl_python() -> Path:
    """The TRL 0.11.4 virtualenv's python, created on first use (torch 2.13.0 first, then TRL)."""
    marker = TRL_VENV / ".installed"
    python = TRL_VENV / "bin" / "python"
    wanted = " ".join([TORCH_SPEC, *TRL_PACKAGES])
    if marker.is_file() and marker.read_text().strip() == wanted:
        return python
    log(f"building the TRL virtualenv in {TRL_VENV.relative_to(ROOT)} ({wanted})")
    WORK.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", sys.executable)
    sh([base, "-m", "venv", "--clear", str(TRL_VENV)])
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if TORCH_SPEC:
        sh([*pip, TORCH_SPEC])
    sh([*pip, *TRL_PACKAGES])
    marker.write_text(wanted + "\n")
    return python


def plot_with(script: str, results: Path, png: Path) -> None:
    """Run a matplotlib ``script`` (argv: results JSON, PNG) in the TRL virtualenv: matplotlib is not
    one of the project's dependencies."""
    python = trl_python()
    if subprocess.run([str(python), "-c", "import matplotlib"], capture_output=True).returncode != 0:
        sh([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "matplotlib"])
    path = WORK / f"plot_{png.stem}.py"
    path.write_text(script)
    sh([str(python), str(path), str(results), str(png)])


def ensure_default_models() -> None:
    """checkpoints/0 and models/reward, built by DVC when missing (fresh clone: ~6.5 min on 2 cores)."""
    if (ROOT / "checkpoints/0/model.safetensors").is_file() and (ROOT / "models/reward/model.safetensors").is_file():
        return
    log("default models missing: dvc repro pretrain train_reward")
    bin_dir = str(Path(sys.executable).parent)  # the stages' `python` must be this venv's
    sh([str(Path(bin_dir) / "dvc"), "repro", "pretrain", "train_reward"],
       env=os.environ | {"HF_HUB_OFFLINE": "1", "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")})


def ppo_section(raw: dict) -> dict:
    from dataclasses import asdict

    from minichatgpt.params import section

    return asdict(section(raw, "ppo"))


def write_initial_value_head(seed: int, root: Path = ROOT) -> Path:
    """minichatgpt's seeded initial value head, handed to TRL so both start from the same weights."""
    from safetensors.torch import save_file

    from minichatgpt.models.policy import PolicyWithValueHead, load_causal_lm

    policy = PolicyWithValueHead(load_causal_lm(root / "checkpoints/0"), seed=seed)
    path = WORK / "value_head0.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in policy.v_head.state_dict().items()}, path)
    return path


def iteration_inputs(raw: dict, batch_size: int, iteration: int, split: str = "train", root: Path = ROOT) -> dict:
    """The prompts and response lengths rollout@iteration would draw, for every contender."""
    import numpy as np
    import pyarrow.parquet as pq

    from minichatgpt.models.tokenizer import load_tokenizer
    from minichatgpt.params import section
    from minichatgpt.ppo.steps import encode_queries, sample_prompts, stage_seed

    ppo, gen = section(raw, "ppo"), section(raw, "generation")
    seed = stage_seed(ppo.seed, "rollout", iteration)
    prompts = pq.read_table(root / "data/prompts.parquet")
    batch = sample_prompts(prompts, split, batch_size, np.random.default_rng(seed))
    queries = encode_queries(load_tokenizer(root / "checkpoints/0"), batch)
    lengths = np.random.default_rng(seed).integers(gen.output_min_length, gen.output_max_length + 1,
                                                   size=len(queries)).tolist()
    fbs = gen.forward_batch_size
    chunk = [round(statistics.mean(lengths[i : i + fbs])) for i in range(0, len(lengths), fbs)]
    return {"queries": queries, "lengths": lengths, "chunk_lengths": chunk}


def same_model_check(a: dict, b: dict) -> dict:
    """Largest absolute difference between the two sides' probe figures (0 up to float rounding)."""
    return {k: max(abs(x - y) for x, y in zip(*(v if isinstance(v, list) else [v] for v in (a[k], b[k]))))
            for k in a}


def workload(raw: dict, runs: list[dict], threads: int, mode: str = "speed", root: Path = ROOT,
             device: str = "cpu") -> dict:
    from minichatgpt.params import section

    ppo = ppo_section(raw)
    return {
        "mode": mode, "policy": str(root / "checkpoints/0"), "reward": str(root / "models/reward"),
        "value_head": str(write_initial_value_head(ppo["seed"], root)), "ppo": ppo, "device": device,
        "probe_ids": runs[0]["iterations"][0]["queries"][0] + [5, 6, 7, 8],
        "threads": threads, "forward_batch_size": section(raw, "generation").forward_batch_size,
        "runs": runs,
    }


class Worker:
    """A contender process (trl_iter.py / ours_iter.py) driven one iteration at a time, so the
    harness can interleave contenders and machine load falls on all of them alike."""

    def __init__(self, python: Path | str, script: str, work: dict, name: str, extra: list[str] | None = None,
                 env_extra: dict[str, str] | None = None):
        wpath = WORK / f"{name}.workload.json"
        wpath.write_text(json.dumps(work))
        self.log_path = WORK / f"{name}.log"
        env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                            "OMP_NUM_THREADS": str(work["threads"])}
        if "trl" in script:  # keep the project (transformers 5) off the TRL side's path
            env.pop("PYTHONPATH", None)
        env |= env_extra or {}
        self.name = name
        self.proc = subprocess.Popen(
            [str(python), str(ROOT / "benchmarks" / script), str(wpath), *(extra or [])], cwd=ROOT, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log_path.open("w"), text=True)
        self.ready = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        raise RuntimeError(f"{self.name} died; see {self.log_path}:\n" + self.log_path.read_text()[-3000:])

    def request(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict:
        out = self.request(cmd="quit")
        self.proc.wait()
        return out


# ---------------------------------------------------------------- scratch DVC copies

def copy_checkout(dest: Path, skip: tuple[str, ...] = ("benchmarks/",)) -> None:
    """A fresh copy of this repository's tracked and untracked, not ignored files in ``dest``, but
    those whose path starts with one of ``skip``."""
    if dest.exists():
        shutil.rmtree(dest)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file() and not rel.startswith(skip):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def write_run_params(dest: Path, raw: dict) -> None:
    """A scratch copy's params.yaml, its iteration stage files for ``ppo.iterations`` and no dvc.lock."""
    import yaml

    from minichatgpt.pipeline import iterations

    (dest / "params.yaml").write_text(yaml.safe_dump(raw, default_flow_style=False, sort_keys=False))
    for lock in [dest / "dvc.lock", *iterations.lock_files(dest)]:
        lock.unlink(missing_ok=True)
    iterations.write(dest, raw["ppo"]["iterations"])


def scratch_repo(name: str, params_edit) -> Path:
    """A copy of this repository (tracked + untracked, not ignored files) under benchmarks/_work,
    with the default models copied in and committed to its own DVC cache, and params edited."""
    import yaml

    dest = WORK / name
    copy_checkout(dest)
    for rel in ("data/params_schema.json", "data/corpus.parquet", "data/prompts.parquet"):
        shutil.copy2(ROOT / rel, dest / rel)
    for rel in ("checkpoints/0", "models/reward"):
        shutil.copytree(ROOT / rel, dest / rel)
    raw = yaml.safe_load((dest / "params.yaml").read_text())
    params_edit(raw)
    write_run_params(dest, raw)
    from minichatgpt.pipeline import inputs

    inputs.write_all(dest, raw)  # check_params' other outputs, for the edited params (it is committed, not run)
    sh(["git", "init", "-q"], cwd=dest)
    dvc = str(Path(sys.executable).parent / "dvc")
    sh([dvc, "commit", "-f", "-q", "check_params", "prepare", "pretrain", "train_reward"], cwd=dest)
    return dest


def stop_warm_workers(var: str, value: str) -> None:
    """SIGTERM the warm workers started with ``var=value`` in their environment (the harness's
    own, not a user's: the variable is part of the worker's key), instead of letting them idle."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "minichatgpt.runtime.worker_server" in (proc.info["cmdline"] or []) and proc.environ().get(var) == value:
                proc.terminate()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def timed_dvc_repro(repo: Path, target: str | None, threads: int, extra_env: dict | None = None,
                    poll_s: float = 0.02) -> dict:
    """Wall time of ``dvc repro target`` (no target: the whole pipeline; process start included),
    per-stage wall time from DVC's 'Running stage' lines, each stage's own time in the order they ran,
    and peak RSS of each stage process (as reported by the warm
    worker for the forked process that ran the stage; with cold stage processes, sampled
    every 20 ms by a thread that only runs then, as it takes CPU time of its own)."""
    import threading

    import psutil

    from minichatgpt.pipeline.iterations import stage_name

    dvc = str(Path(sys.executable).parent / "dvc")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PATH": str(Path(sys.executable).parent) + os.pathsep
                        + os.environ.get("PATH", ""), "OMP_NUM_THREADS": str(threads),
                        "MINICHATGPT_WORKER_REPORT": "1", **(extra_env or {})}
    marks: list[tuple[float, str]] = []
    rss: dict[str, int] = {}
    inside: dict[str, float] = {}
    inside_runs: list[tuple[str, float]] = []
    gpu: dict[str, float] = {}
    done = threading.Event()
    start = time.perf_counter()
    proc = subprocess.Popen([dvc, "repro", *([target] if target else [])], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

    def sample() -> None:
        parent = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                for child in parent.children(recursive=True):
                    try:
                        cmd = " ".join(child.cmdline())
                        mem = child.memory_info().rss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
                    if "stages/" in cmd:
                        stage = cmd.split("stages/", 1)[1].split(".py", 1)[0]
                        rss[stage] = max(rss.get(stage, 0), mem)
            except psutil.NoSuchProcess:
                break
            time.sleep(poll_s)

    sampler = threading.Thread(target=sample, daemon=True)
    if env.get("MINICHATGPT_WORKER") == "0":
        sampler.start()
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith("Running stage '"):
            marks.append((time.perf_counter(), stage_name(line.split("'")[1])))  # rollout@1
        elif line.startswith("[") and "] done in " in line:  # the stage's own time, from run() to outputs fsynced
            stage = line[1:].split("]", 1)[0]
            inside[stage] = float(line.split("] done in ", 1)[1].split("s", 1)[0])
            if marks:  # stages run one at a time: this is the one DVC started last (rollout@3)
                inside_runs.append((marks[-1][1], inside[stage]))
            if " gpu_peak_mb=" in line:  # a stage that ran on CUDA (minichatgpt.runtime.stage)
                peak = float(line.split(" gpu_peak_mb=", 1)[1].split()[0])
                gpu[stage] = max(gpu.get(stage, 0.0), peak)
        elif line.startswith("[worker] ") and "peak_rss_mb=" in line:  # stage run by the warm worker
            stage = line.split()[1].removesuffix(".py")
            rss[stage] = max(rss.get(stage, 0), int(float(line.rsplit("=", 1)[1]) * 2**20))
    code = proc.wait()
    end = time.perf_counter()
    done.set()
    if sampler.is_alive():
        sampler.join()
    if code != 0:
        raise RuntimeError(f"dvc repro {target} failed in {repo}:\n{''.join(output[-40:])}")
    runs = [(name, nxt - t) for (t, name), nxt in zip(marks, [m[0] for m in marks[1:]] + [end])]
    return {"s": end - start, "stages_s": {name.split("@")[0]: s for name, s in runs}, "stage_inside_s": inside,
            "inside_runs_s": inside_runs,
            "stage_gpu_peak_mb": gpu, "runs_s": runs, "marks": [(t - start, name) for t, name in marks],
            "stage_peak_rss_mb": {k: v / 2**20 for k, v in rss.items()}}


def emit(obj: dict) -> None:
    """One result line of the lockstep protocol (the contenders' side)."""
    sys.stdout.write("RESULT " + json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve_lockstep(work: dict, import_s: float, probed: dict | None, step) -> None:
    """The contenders' side of bench.py's lockstep protocol: a ready line, then one RESULT line per
    command on stdin (``step(spec, cmd)`` for a step; peak RSS, then exit, for anything else).

    Stdlib only: both the TRL venv and ours import this file."""
    emit({"ready": True, "import_s": import_s, "probe": probed})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "step":
            emit(step(work["runs"][0]["iterations"][cmd["index"]], cmd))
        else:
            emit({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
            return
