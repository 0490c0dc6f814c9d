"""The process environment every stage computes under: the same on every machine and for every caller.

An output's bytes must be a function of the stage's code, params and inputs. The caller's
environment gets in two ways: libraries read variables when they load (transformers wrote
``HF_HUB_OFFLINE`` into ``tokenizer_config.json``; ``OMP_*``/``MKL_*``/``KMP_*`` change how
reductions are split), and the math libraries pick SIMD kernels by the CPU they run on
(AVX-512 and AVX2 kernels add floats in different orders, so the same step gives different
bits on different machines).

So a stage process, before importing anything that computes, replaces its environment with
:func:`stage_environ`: the caller's variables that only say *where* things are or *how* the
stage is run (:data:`PASSED`), plus fixed values (:data:`PINNED`) that cap every library's
kernel choice at AVX2 code paths that all x86-64 CPUs with AVX2 share, Intel or AMD. If its
environment differs it re-executes itself under the new one (same PID, argv and descriptors).
The speed this costs is measured by ``make bench``.
"""

from __future__ import annotations

import os
import sys

PASSED = frozenset({
    # where things are
    "PATH", "HOME", "USER", "LOGNAME", "VIRTUAL_ENV", "PYTHONPATH", "TMPDIR", "XDG_CACHE_HOME",
    "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "HF_ENDPOINT", "HF_TOKEN",
    # may a stage download (a stage that needs the network and has none fails; it never falls back)
    "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
    # the rendezvous of `accelerate launch` (torchrun) for runtime.launcher
    "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
    # which GPUs a stage may use (runtime.device), and how NCCL reaches the other processes' GPUs
    "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE", "NCCL_IB_HCA",
    "NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE", "NCCL_DEBUG",
    "TERM", "NO_COLOR",
})
PASSED_PREFIXES = (
    "MINICHATGPT_", "_MINICHATGPT_",  # this project's switches: how a stage runs (warm worker, debug), not what
    "TORCHELASTIC_",  # torchrun's bookkeeping for `accelerate launch`
)
"""Caller variables a stage keeps; everything else (locale, TZ, OMP_*, MKL_*, TORCH_*, PYTHON*,
TRANSFORMERS_* but the offline switch, DVC_*, cloud credentials ...) is dropped."""

PINNED = {
    # ATen's own vectorised kernels (reductions, softmax, GELU, Adam, sampling): 256-bit on every CPU
    "ATEN_CPU_CAPABILITY": "avx2",
    # MKL: sgemm (every float32 matmul) and VML (torch.exp, log, ...). Its SSE2 branch without
    # approximate reciprocals is the one Intel guarantees to give the same bits on Intel and
    # non-Intel CPUs (AVX2 is honoured on Intel only: an emulated AMD CPU gave other gradients)
    "MKL_CBWR": "COMPATIBLE",
    # NumPy's runtime-dispatched kernels (float64 exp/log differ between AVX-512 and AVX2)
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
    # oneDNN (bf16 / mixed-precision paths): no AVX-512 or AMX kernels
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    # Arrow's compute kernels
    "ARROW_USER_SIMD_LEVEL": "AVX2",
    # one thread unless a stage sets runtime.threads (torch.set_num_threads), not the machine's count
    "OMP_NUM_THREADS": "1",
    # the BPE trainer's thread pool (tokenizers): fixed, not the machine's core count
    "RAYON_NUM_THREADS": "1",
    # cuBLAS: a fixed workspace, so its reductions give the same bits on every run (runtime.device: cuda)
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    # torch.cuda.is_available() asks NVML, not the CUDA driver, so asking does not break CUDA in forked children
    "PYTORCH_NVML_BASED_CUDA_CHECK": "1",
    # Python: string hashing, text encoding and locale
    "PYTHONHASHSEED": "0",
    "PYTHONUTF8": "1",
    "PYTHONCOERCECLOCALE": "0",
    "LC_ALL": "C.UTF-8",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
"""Fixed values every stage process runs with."""

THREAD_RUNTIME_PREFIXES = ("OMP_", "GOMP_", "KMP_", "MKL_")
"""Settings of the OpenMP and MKL runtimes, which a stage never inherits."""

_REEXEC = "_MINICHATGPT_HERMETIC"
"""Set on the re-executed process: a second mismatch is reported instead of looping."""


def project_root(script: str) -> str | None:
    """The checkout a stage script belongs to (``<root>/stages/<name>.py`` beside ``<root>/minichatgpt``)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(script)))
    return root if os.path.isfile(os.path.join(root, "minichatgpt", "__init__.py")) else None


def stage_environ(environ: dict[str, str] | None = None, root: str | None = None) -> dict[str, str]:
    """The environment a stage runs under, given its caller's and the checkout of its script.

    ``root`` goes first on ``PYTHONPATH``: a stage imports the package beside its script, so an
    experiment that DVC runs in its own copy (``dvc exp run --queue`` / ``--temp``) runs that
    copy's code, not the workspace package an editable install points at.
    """
    environ = dict(os.environ if environ is None else environ)
    env = {k: v for k, v in environ.items() if k in PASSED or k.startswith(PASSED_PREFIXES)}
    if root is not None:
        rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join([root, *(rest[1:] if rest[:1] == [root] else rest)])
    env.update(PINNED)
    if _REEXEC in environ:
        env[_REEXEC] = environ[_REEXEC]
    return env


def enter() -> None:
    """Make this process run under :func:`stage_environ`; re-executes it if its environment differs.

    Must run before torch, numpy or pyarrow are imported (they read the knobs when they load).
    """
    target = stage_environ(root=project_root(sys.argv[0]))
    if dict(os.environ) == target and _imported_from(target):
        return
    if _REEXEC in os.environ:  # re-executed once already: something rewrote the environment at start-up
        changed = sorted(set(os.environ.items()) ^ set(target.items()))
        print(f"minichatgpt: stage environment differs after re-exec: {changed}", file=sys.stderr)
        os.environ.clear()
        os.environ.update(target)
        return
    target[_REEXEC] = "1"
    argv = [sys.executable, *sys.orig_argv[1:]]
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execve(sys.executable, argv, target)


def _imported_from(env: dict[str, str]) -> bool:
    """Whether this process imported the package its ``PYTHONPATH`` puts first (else re-exec)."""
    first = env.get("PYTHONPATH", "").split(os.pathsep)[0]
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    return not first or os.path.realpath(first) == here


def pin_this_process() -> None:
    """Apply :data:`PINNED` to this process without re-executing it (tests, notebooks).

    Takes effect only for libraries not imported yet, so call it first; results then match the
    stages' bit for bit.
    """
    pins = {k: v for k, v in PINNED.items() if not k.startswith(("PYTHON", "LC_"))}
    if all(os.environ.get(k) == v for k, v in pins.items()):
        return  # already pinned (before the libraries loaded, or this raised)
    loaded = [m for m in ("torch", "numpy", "pyarrow", "tokenizers") if m in sys.modules]
    if loaded:
        raise RuntimeError(f"pin_this_process() must run before importing {', '.join(loaded)}")
    for key in [k for k in os.environ if k.startswith(THREAD_RUNTIME_PREFIXES)]:
        del os.environ[key]  # e.g. MKL_NUM_THREADS, KMP_AFFINITY, GOMP_SPINCOUNT: threads and scheduling
    os.environ.update(pins)
