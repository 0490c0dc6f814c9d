"""``python benchmarks/cross_cpu.py``: the tiny pipeline on this CPU and on emulated x86-64 CPUs, hash by hash.

Runs `dvc repro` of the tiny preset in fresh scratch repositories, once natively and once per
emulated CPU, where every stage process runs under qemu-user's emulation of another CPU model
(default: EPYC-Rome, an AMD CPU with AVX2 and no AVX-512, and Haswell, an Intel CPU with AVX2 and
no AVX-512; qemu 7.2's TCG implements AVX2 and FMA). The stages pin their kernels
(``minichatgpt.hermetic.PINNED``), so every output hash must match the native run. Needs
``apt-get install qemu-user``. Emulation is slow: ~1 minute per stage (importing torch).
Writes ``benchmarks/cross_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minichatgpt.runtime.hermetic import stage_environ  # noqa: E402
from tests.conftest import TINY_PARAMS, make_pipeline_repo, out_hashes_of, tool_env  # noqa: E402


def repro(repo: Path, env: dict[str, str]) -> dict:
    start = time.perf_counter()
    run = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"dvc repro failed in {repo}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    done = {m.group(1): float(m.group(2)) for m in re.finditer(r"\[(\w+)\] done in ([\d.]+)s", run.stderr)}
    return {"hashes": out_hashes_of((repo / "dvc.lock").read_text()), "seconds": time.perf_counter() - start,
            "stage_seconds": done}


def emulated_env(base: dict[str, str], cpu: str, bin_dir: Path) -> dict[str, str]:
    """``base`` with ``python`` on PATH replaced by the interpreter under ``qemu-x86_64 -cpu <cpu>``.

    The wrapper starts the stage directly under its stage environment, so the stage does not
    re-execute itself (a re-exec would leave the emulator and run natively)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    env = base | {"PATH": f"{bin_dir}:{base['PATH']}"}
    stage_env = stage_environ(env)
    assigns = " ".join(shlex.quote(f"{k}={v}") for k, v in sorted(stage_env.items()))
    wrapper = bin_dir / "python"
    wrapper.write_text(f"#!/bin/sh\nexec env -i {assigns} qemu-x86_64 -cpu {shlex.quote(cpu)} "
                       f"{shlex.quote(sys.executable)} \"$@\"\n")
    wrapper.chmod(0o755)
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpus", default="EPYC-Rome,Haswell", help="qemu CPU models (qemu-x86_64 -cpu help)")
    ap.add_argument("--work", default=str(ROOT / "benchmarks/_work/cross_cpu"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/cross_cpu.json"))
    args = ap.parse_args()
    if not shutil.which("qemu-x86_64"):
        raise SystemExit("qemu-x86_64 not found: apt-get install qemu-user")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    base = tool_env() | {"MINICHATGPT_WORKER": "0"}  # every stage its own (emulated) process
    results = {"native": repro(make_pipeline_repo(work / "native", TINY_PARAMS), base)}
    print(f"native: {len(results['native']['hashes'])} outputs in {results['native']['seconds']:.0f}s", flush=True)
    for cpu in filter(None, args.cpus.split(",")):
        env = emulated_env(base, cpu, work / f"bin-{cpu}")
        results[cpu] = repro(make_pipeline_repo(work / cpu, TINY_PARAMS), env)
        native = results["native"]["hashes"]
        differ = sorted(k for k, v in results[cpu]["hashes"].items() if native.get(k) != v)
        results[cpu]["differing_outputs"] = differ
        print(f"{cpu}: {len(results[cpu]['hashes']) - len(differ)} of {len(native)} output hashes equal "
              f"the native run in {results[cpu]['seconds']:.0f}s; differing: {differ or 'none'}", flush=True)
    results["machine"] = Path("/proc/cpuinfo").read_text().split("model name")[1].split("\n")[0].strip(" :\t")
    Path(args.out).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
