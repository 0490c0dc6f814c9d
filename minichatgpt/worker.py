"""Warm worker: stage processes skip the ~4 s of importing torch and transformers.

A stage script (``python stages/<name>.py ...``) first asks a long-lived worker,
over a Unix socket private to this user, interpreter, package and environment, to run
it. The worker has imported the heavy libraries but never computes anything itself;
for each request it forks a child that takes over the stage's stdin/stdout/stderr
(passed as file descriptors), argv, working directory and environment, runs the same
script from disk and exits with its exit code, which the stage process then exits
with. Every input is still read from and every output written to the stage's files
by that child, with the same atomic writes, so outputs are bit-identical to a cold run.

Safety:

- no worker, a refused connection, a worker that dies, or library/package sources
  changed since the worker started ("stale"): the stage runs in its own process as
  before (and starts a fresh worker in the background for the next stage);
- the stage process killed (e.g. ``dvc repro`` interrupted): the worker kills the
  child at once; the worker dying kills its children (``PR_SET_PDEATHSIG``);
- the worker exits after ``MINICHATGPT_WORKER_IDLE`` seconds without work (default 300);
- ``MINICHATGPT_WORKER=0`` turns all of this off.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

SWITCH = "MINICHATGPT_WORKER"
IN_CHILD = "_MINICHATGPT_WORKER_CHILD"
PACKAGE = Path(__file__).resolve().parent
KEY_ENV = ("HF_", "TRANSFORMERS", "TORCH", "OMP_", "MKL_", "KMP_", "OPENBLAS", "CUDA", "PYTHON", "TOKENIZERS",
           "LD_", "MINICHATGPT", "NUMEXPR", "XDG_CACHE")
"""environment read at import time by the libraries: a worker only serves clients with the same values."""
PRELOAD = (
    # pq.read_table goes through pyarrow.dataset and imports pandas: 0.3 s in every stage child if not here
    "numpy", "pyarrow", "pyarrow.parquet", "pyarrow.dataset", "pyarrow.compute", "pyarrow.pandas_compat", "pandas",
    "yaml", "torch", "torch.profiler", "safetensors.torch", "tqdm.auto", "tokenizers",
    "transformers", "transformers.models.auto.modeling_auto", "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.bert.modeling_bert", "transformers.tokenization_utils_fast",
    "transformers.models.auto.tokenization_auto", "transformers.models.encoder_decoder.configuration_encoder_decoder",
    "minichatgpt.artifacts", "minichatgpt.params", "minichatgpt.seeding", "minichatgpt.core",
    "minichatgpt.models", "minichatgpt.rollout", "minichatgpt.iteration", "minichatgpt.ppo",
    "minichatgpt.reward", "minichatgpt.evaluation", "minichatgpt.data", "minichatgpt.stage", "minichatgpt.host",
)


def enabled() -> bool:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # accelerate launch: processes join a group themselves
    return (os.environ.get(SWITCH, "1") != "0" and not os.environ.get(IN_CHILD) and hasattr(socket, "AF_UNIX")
            and not distributed)


def socket_path() -> Path:
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(KEY_ENV) and k != IN_CHILD)
    key = json.dumps([sys.executable, sys.version, str(PACKAGE), env])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"minichatgpt-{os.getuid()}-{digest}.sock"


# ------------------------------------------------------------------------------ client

def delegate() -> int | None:
    """Run this stage process's script in the worker; its exit code, or None to run here."""
    if not enabled():
        return None
    path = socket_path()
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(str(path))
    except OSError:
        spawn(path)
        return None
    try:
        header = json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
        socket.send_fds(conn, [struct.pack("!I", len(header)) + header], [0, 1, 2])
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = conn.recv(4096)
            if not chunk:
                return None  # worker gone before answering: run here (outputs are atomic, a rerun is safe)
            reply += chunk
        answer = json.loads(reply)
    except OSError:
        return None
    finally:
        conn.close()
    if answer.get("stale"):
        spawn(path)
        return None
    if os.environ.get("MINICHATGPT_WORKER_REPORT"):  # for benchmarks/: the stage's peak RSS
        print(f"[worker] {os.path.basename(sys.argv[0])} peak_rss_mb={answer.get('maxrss_kb', 0) / 1024:.1f}",
              file=sys.stderr, flush=True)
    return int(answer["code"])


def _spawn_lock(path: Path) -> Path:
    return path.with_name(path.name + ".starting")


def spawn(path: Path) -> None:
    """Start a worker in the background (its own session, no stdio) for the next stages,
    unless one is already starting (it takes a few seconds to import before it listens)."""
    import subprocess

    lock = _spawn_lock(path)
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        try:
            if time.time() - lock.stat().st_mtime < 120:
                return
            lock.unlink()  # a worker that never came up: try again next time
        except OSError:
            pass
        return
    except OSError:
        return

    env = dict(os.environ)
    env["PYTHONPATH"] = str(PACKAGE.parent) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        subprocess.Popen(
            [sys.executable, "-m", "minichatgpt.worker", str(path), str(PACKAGE)],
            cwd="/", env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )
    except OSError:
        pass


# ------------------------------------------------------------------------------ worker

def _sources() -> dict[str, tuple[int, int]]:
    """mtime and size of every loaded module file of this package and of torch/transformers."""
    out = {}
    roots = [str(PACKAGE)]
    for name in ("torch", "transformers", "pyarrow", "numpy"):
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "__file__", None):
            out[mod.__file__] = None  # type: ignore[assignment]
    for mod in list(sys.modules.values()):
        file = getattr(mod, "__file__", None)
        if file and file.startswith(tuple(roots)):
            out[file] = None  # type: ignore[assignment]
    for file in out:
        try:
            st = os.stat(file)
            out[file] = (st.st_mtime_ns, st.st_size)
        except OSError:
            out[file] = (-1, -1)
    return out


def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    if len(data) < 4:
        raise OSError("short request")
    (size,) = struct.unpack("!I", data[:4])
    body = data[4:]
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise OSError("request cut short")
        body += chunk
    return json.loads(body), list(fds)


def _child(request: dict, fds: list[int], inherited: list[socket.socket]) -> None:
    """In the forked child: become the stage process and run its script; never returns."""
    code = 1
    try:
        _die_with_parent()
        for sock in inherited:  # the worker's listener and other stages' connections
            sock.close()
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ[IN_CHILD] = "1"
        import runpy
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        script = os.path.abspath(request["argv"][0])
        sys.argv = list(request["argv"])
        sys.path[0] = os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exit_:
        if isinstance(exit_.code, int) or exit_.code is None:
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - report like an uncaught exception in a process would
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _die_with_parent() -> None:
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _warm_up() -> None:
    """Pay transformers' first-load costs (regex compilation, lazy imports) once, on a tiny
    throw-away GPT-2 and BERT. One torch thread: no OpenMP pool exists when children fork."""
    import torch

    torch.set_num_threads(1)
    rng = torch.random.get_rng_state()  # restored below: children see a fresh process's global RNG
    import tqdm
    from transformers.utils import logging as hf_logging

    tqdm.tqdm.monitor_interval = 0  # no tqdm monitor thread in a process that forks
    hf_logging.disable_progress_bar()
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
    )

    with tempfile.TemporaryDirectory() as tmp:
        GPT2LMHeadModel(GPT2Config(vocab_size=8, n_positions=8, n_embd=8, n_layer=1, n_head=1)) \
            .save_pretrained(f"{tmp}/gpt2")
        BertForSequenceClassification(BertConfig(
            vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
            max_position_embeddings=8)).save_pretrained(f"{tmp}/bert")
        AutoModelForCausalLM.from_pretrained(f"{tmp}/gpt2")
        AutoModelForSequenceClassification.from_pretrained(f"{tmp}/bert")
    torch.random.set_rng_state(rng)
    hf_logging.enable_progress_bar()


def serve(path: Path, idle_s: float) -> None:
    import importlib
    import selectors
    import signal

    for name in PRELOAD:
        importlib.import_module(name)
    try:
        _warm_up()
    except Exception:  # noqa: BLE001 - only a speed-up; children load models themselves anyway
        pass
    snapshot = _sources()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    listener.bind(str(tmp))
    os.chmod(tmp, 0o600)
    listener.listen(16)
    inode = os.stat(tmp).st_ino
    os.replace(tmp, path)  # atomically take over the name (a racing worker just idles out)
    _spawn_lock(path).unlink(missing_ok=True)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    last = time.monotonic()
    accepting = True
    try:
        while True:
            for key, _ in sel.select(timeout=0.02 if children else 1.0):
                if key.fileobj is listener:
                    conn, _ = listener.accept()
                    try:
                        request, fds = _recv_request(conn)
                    except (OSError, ValueError):
                        conn.close()
                        continue
                    if _sources() != snapshot:  # code changed under us: let the client run it cold
                        accepting = False
                        conn.sendall(b'{"stale": true}\n')
                        conn.close()
                        for fd in fds:
                            os.close(fd)
                        continue
                    pid = os.fork()
                    if pid == 0:
                        _child(request, fds, [listener, conn, *children.values()])
                    for fd in fds:
                        os.close(fd)
                    children[pid] = conn
                    sel.register(conn, selectors.EVENT_READ, pid)
                    last = time.monotonic()
                else:  # the stage process hung up or was killed: so is its child
                    if not key.fileobj.recv(1):
                        try:
                            os.kill(key.data, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                        sel.unregister(key.fileobj)
            while children:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
                if pid == 0:
                    break
                conn = children.pop(pid)
                code = os.waitstatus_to_exitcode(status)
                if code < 0:  # killed by a signal: exit as a shell reports it
                    code = 128 - code
                try:
                    conn.sendall(json.dumps({"code": code, "maxrss_kb": usage.ru_maxrss}).encode() + b"\n")
                except OSError:
                    pass
                try:
                    sel.unregister(conn)
                except (KeyError, ValueError):
                    pass
                conn.close()
                last = time.monotonic()
            if accepting is False:
                _unlink_own(path, inode)
                sel.unregister(listener)
                listener.close()
                accepting = None  # type: ignore[assignment]
            if not children and (accepting is None or time.monotonic() - last > idle_s):
                break
    finally:  # idle, stale, or SIGTERM: give the name back unless a newer worker holds it
        if accepting is not None:
            _unlink_own(path, inode)


def _unlink_own(path: Path, inode: int) -> None:
    """Remove the socket name unless a newer worker has taken it over."""
    try:
        if os.stat(path).st_ino == inode:
            path.unlink()
    except OSError:
        pass


def _terminate(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    raise SystemExit(0)


if __name__ == "__main__":
    import signal as _signal

    sock_path, package = Path(sys.argv[1]), Path(sys.argv[2])
    if package != PACKAGE:  # resolved another copy of the package than the client's
        sys.exit(0)
    _signal.signal(_signal.SIGTERM, _terminate)  # children reset it; the worker removes its socket name
    serve(sock_path, float(os.environ.get("MINICHATGPT_WORKER_IDLE", "300")))
