"""Warm worker, client side: stage processes skip the ~4 s of importing torch and transformers.

A stage script (``python stages/<name>.py ...``) first asks a long-lived worker
(:mod:`minichatgpt.runtime.worker_server`), over a Unix socket private to this user,
interpreter, package and environment, to run it. The worker has imported the heavy
libraries but never computes anything itself; a child forked from it (ahead of time)
takes over the stage's stdin/stdout/stderr (passed as file descriptors), argv, working
directory and environment, runs the same script from disk and answers with its exit
code, which the stage process then exits with. Every input is still read from and
every output written to the stage's files by that child, with the same atomic writes,
so outputs are bit-identical to a cold run.

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

import json
import os
import socket
import struct
import sys
import time

# The client half (every stage process runs it before anything else) imports only what
# Python has loaded anyway, plus socket and json: hashlib, tempfile and pathlib would add
# ~15 ms to each stage.
SWITCH = "MINICHATGPT_WORKER"
IN_CHILD = "_MINICHATGPT_WORKER_CHILD"
PACKAGE = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
"""the minichatgpt package directory this worker client belongs to."""
KEY_ENV = ("HF_", "TRANSFORMERS", "TORCH", "OMP_", "MKL_", "KMP_", "OPENBLAS", "CUDA", "PYTHON", "TOKENIZERS",
           "LD_", "MINICHATGPT", "NUMEXPR", "XDG_CACHE")
"""environment read at import time by the libraries: a worker only serves clients with the same values."""


def enabled() -> bool:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # accelerate launch: processes join a group themselves
    return (os.environ.get(SWITCH, "1") != "0" and not os.environ.get(IN_CHILD) and hasattr(socket, "AF_UNIX")
            and not distributed)


def _sha256_hex(data: bytes) -> str:
    try:  # the builtin module: hashlib's OpenSSL binding takes ~5 ms to import
        from _sha256 import sha256  # Python <= 3.11
    except ImportError:
        try:
            from _sha2 import sha256  # Python >= 3.12
        except ImportError:
            from hashlib import sha256
    return sha256(data).hexdigest()


def _temp_dir() -> str:
    """tempfile.gettempdir()'s choice for the usual cases, without importing tempfile."""
    for var in ("TMPDIR", "TEMP", "TMP"):
        path = os.environ.get(var)
        if path and os.path.isdir(path):
            return path
    return "/tmp"


def private_dir() -> str | None:
    """This user's socket directory (mode 0700, owned by us, not a link), created if missing;
    None if the name is taken by anything else (another user's directory, a link, a file).

    In a shared temp directory a predictable socket name can be bound by another local user
    once our worker idles out; inside a directory only we can write to, it cannot."""
    path = os.path.join(_temp_dir(), f"minichatgpt-{os.getuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        st = os.lstat(path)
    except OSError:
        return None
    import stat

    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return path


def socket_path() -> str | None:
    """The worker socket for this interpreter, package and environment; None: no safe place for one."""
    directory = private_dir()
    if directory is None:
        return None
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(KEY_ENV) and k != IN_CHILD)
    key = json.dumps([sys.executable, sys.version, PACKAGE, env])
    digest = _sha256_hex(key.encode())[:16]
    return os.path.join(directory, f"{digest}.sock")


def peer_uid(conn: socket.socket) -> int | None:
    """The uid of the process listening on the other end of a connected Unix socket (Linux)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid


# ------------------------------------------------------------------------------ client

def delegate() -> int | None:
    """Run this stage process's script in the worker; its exit code, or None to run here."""
    if not enabled():
        return None
    path = socket_path()
    if path is None:  # no private directory for the socket: never talk to whatever is there
        return None
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(str(path))
    except OSError:
        spawn(path)
        return None
    try:
        if peer_uid(conn) != os.getuid():  # not our worker: send it nothing (no environment, no descriptors)
            conn.close()
            return None
        header = json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
        socket.send_fds(conn, [struct.pack("!I", len(header)) + header], [0, 1, 2])
        reply = b""
        while b"\n" not in reply:
            chunk = conn.recv(4096)
            if not chunk:
                return None  # worker gone before answering: run here (outputs are atomic, a rerun is safe)
            reply += chunk
        answer = json.loads(reply.split(b"\n", 1)[0])  # the child's answer; the worker may add its own
    except (OSError, ValueError):  # a garbled answer: run here, as if the worker were gone
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


_reply_to: socket.socket | None = None
"""In a worker child: the connection of the stage process it runs for."""


def finish(code: int) -> None:
    """End this stage process with ``code``; never returns.

    In a worker child, answer the waiting stage process first: it exits at once instead
    of after this copy of the worker's memory is torn down (~15 ms per stage). The
    worker still answers for a child that dies without answering (a signal).
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if _reply_to is not None:
        import resource

        maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            _reply_to.sendall(json.dumps({"code": code, "maxrss_kb": maxrss_kb}).encode() + b"\n")
        except OSError:
            pass
    os._exit(code)


def _spawn_lock(path: str) -> str:
    return path + ".starting"


def spawn(path: str) -> None:
    """Start a worker in the background (its own session, no stdio) for the next stages,
    unless one is already starting (it takes a few seconds to import before it listens)."""
    import subprocess

    lock = _spawn_lock(path)
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        try:
            if time.time() - os.stat(lock).st_mtime < 120:
                return
            os.unlink(lock)  # a worker that never came up: try again next time
        except OSError:
            pass
        return
    except OSError:
        return

    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(PACKAGE) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        subprocess.Popen(
            [sys.executable, "-m", "minichatgpt.runtime.worker_server", path, PACKAGE],
            cwd="/", env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )
    except OSError:
        pass
