"""Shared edge logic of the stage scripts: arguments, logging, seeding, errors, exit.

Every failure that is the user's input (params, artifacts, models) ends as one
line ``stage <name>: <what is wrong>`` on stderr and exit code 2, with nothing
written, because outputs are only moved into place after the stage succeeds.

Before anything else a stage process puts itself under the stage environment
(:mod:`minichatgpt.runtime.hermetic`: the caller's settings dropped, CPU kernels pinned), so
its outputs depend on code, params and inputs only. Then it hands its whole run to a
warm worker when one is available (:mod:`minichatgpt.runtime.worker`): a forked copy of a
process that has already imported torch and transformers runs the same script with the
same argv, cwd, environment and file descriptors, so only the ~4 s of imports is skipped. Without a worker
(or with ``MINICHATGPT_WORKER=0``) the stage runs in its own process as before.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~4 ms)
if TYPE_CHECKING:  # the stage process imports no more than it needs to hand itself to the worker
    import argparse
    from collections.abc import Callable

USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, ValueError, FloatingPointError)
"""Refused input: ParamsError, ArtifactError and ModelError are ValueErrors, and the
non-finite guards raise FloatingPointError. Matching base classes keeps torch out of
the start-up of stages that do not need it."""


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    import argparse

    p = argparse.ArgumentParser(prog=f"stages/{name}.py", description=(doc or "").strip().splitlines()[0])
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


def setup_torch(threads: int) -> None:
    import torch

    from minichatgpt.runtime.host import keep_freed_memory

    torch.set_num_threads(max(1, threads))
    keep_freed_memory()
    # CPU kernels used here are deterministic for a fixed thread count; not calling
    # torch.use_deterministic_algorithms avoids importing torch._inductor (~2 s per stage).
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def die_with_parent(period_s: float = 0.5) -> None:
    """Kill this process when its parent (``dvc``) dies: an orphaned stage would go on to write
    its outputs after DVC gave up on them, racing a rerun with code DVC no longer runs."""
    import signal
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(period_s)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="minichatgpt-parent-watch", daemon=True).start()


class CodeChangedError(ValueError):
    """A source of this stage changed on disk while it ran."""


def process_start_time() -> float:
    """When this process started (wall clock, 10 ms resolution)."""
    import time

    with open("/proc/self/stat") as f:
        ticks = int(f.read().rpartition(")")[2].split()[19])  # field 22: start time, in clock ticks since boot
    since_start = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - since_start


def _code_unchanged_since(started: float) -> Callable[[], None]:
    """A check that no source this stage runs (its script, the package modules it imported) changed
    after it started: DVC hashes the code after the stage, so outputs of the code before an edit
    would be recorded under the edited code's hash."""
    script = os.path.abspath(sys.argv[0])
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep

    def check() -> None:
        files = [script] + sorted({m.__file__ for m in list(sys.modules.values())
                                   if isinstance(getattr(m, "__file__", None), str) and m.__file__.startswith(package)})
        for file in files:
            try:
                changed = os.stat(file).st_ctime > started - 0.02  # the start time is exact to a clock tick
            except FileNotFoundError:
                changed = True
            if changed:
                raise CodeChangedError(f"{os.path.relpath(file)}: changed while this stage ran, so its outputs would "
                                       "not be what the code on disk computes; nothing was written, run it again")

    return check


def _gpu_figures() -> dict:
    """Peak GPU memory of a stage that used CUDA, for its log line (benchmarks/gpu_check.py reads it)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return {}
    return {"gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20}


def run(name: str, main: Callable[[], dict | None]) -> None:
    """Run ``main`` with stage logging and error handling, then exit without teardown.

    Outputs are fsynced before this returns, so skipping interpreter shutdown
    (``os._exit``) loses nothing and saves a second per stage process.
    """
    from minichatgpt.runtime import hermetic, worker

    hermetic.enter()  # the same environment and CPU kernels for every caller, on every machine
    code = worker.delegate()
    if code is not None:  # the worker ran this stage to the end (outputs fsynced, or refused input)
        os._exit(code)
    if not os.environ.get(worker.IN_CHILD):  # (the worker kills its child when the stage process dies)
        die_with_parent()
    from minichatgpt.pipeline import artifacts

    artifacts.commit_guards.append(_code_unchanged_since(worker.served_at or process_start_time()))
    import logging
    import time

    log = logging.getLogger("minichatgpt")
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(message)s", stream=sys.stderr)
    start = time.perf_counter()
    code = 0
    try:
        summary = (main() or {}) | _gpu_figures()
        figures = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
        log.info("done in %.2fs %s", time.perf_counter() - start, figures)
    except USER_ERRORS as err:
        if os.environ.get("MINICHATGPT_DEBUG"):
            raise
        print(f"stage {name}: {err}", file=sys.stderr)
        code = 2
    worker.finish(code)  # flushes; in a worker child, answers the stage process first
