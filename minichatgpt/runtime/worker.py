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

Exactness: a worker serves only stage processes it would give the bytes of a cold run:

- its socket's name is a hash of everything a forked child inherits from the worker
  instead of from the stage process: the interpreter, the package directory, the whole
  stage environment (but :data:`KEY_IGNORED`), umask, nice, scheduler, rlimits, CPU
  affinity, cgroup, namespaces, ids and capabilities (:func:`process_facts`); a caller that
  differs in any of them finds no worker and runs cold (and starts its own);
- the child re-checks the environment and those facts against the request, and the
  sources the worker loaded (every loaded module and mapped library, and the record of
  every distribution they come from) against their state when it started importing:
  a change since then ("stale") makes the stage run cold and the worker quit;
- SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1/2, SIGTSTP and SIGCONT sent to the stage
  process are passed to the child, which also stops while the stage process is stopped
  (SIGSTOP); the child is killed when the stage process dies, and the stage process and
  its child die when the stage's parent (``dvc``) dies.

Safety: no worker, a refused connection or directory, a listener of another uid, a
worker that dies, or a garbled answer: the stage runs in its own process (outputs are
atomic, a rerun is safe). The worker exits after ``MINICHATGPT_WORKER_IDLE`` seconds
without work (default 300); ``MINICHATGPT_WORKER=0`` turns all of this off.
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
KEY_IGNORED = frozenset({"_MINICHATGPT_HERMETIC", "MINICHATGPT_WORKER_REPORT", "MINICHATGPT_WORKER_IDLE"})
"""Variables left out of the worker's key: the re-exec marker of the stage environment, the
benchmarks' report switch (a stderr line after the stage) and the worker's idle time. No
library reads them."""


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


def key_environ(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The part of a stage environment that selects a worker: all of it but :data:`KEY_IGNORED`."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k not in KEY_IGNORED and k != IN_CHILD}


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def process_facts() -> dict:
    """What a caller can set on its process besides the environment, and a forked child would
    inherit from the worker instead: a worker serves only callers with equal facts."""
    import resource

    mask = os.umask(0o022)
    os.umask(mask)
    status = _read("/proc/self/status") or ""
    facts = {
        "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), sorted(os.getgroups())],
        "umask": mask,
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "rlimits": {name: resource.getrlimit(getattr(resource, name)) for name in sorted(dir(resource))
                    if name.startswith("RLIMIT_")},
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "scheduler": os.sched_getscheduler(0) if hasattr(os, "sched_getscheduler") else None,
        "cgroup": _read("/proc/self/cgroup"),
        "oom_score_adj": _read("/proc/self/oom_score_adj"),
        # capabilities, seccomp, no_new_privs and memory nodes
        "status": [line for line in status.splitlines() if line.startswith(
            ("Cap", "Seccomp:", "NoNewPrivs:", "Mems_allowed_list:", "Speculation"))],
        "namespaces": {},
    }
    for ns in ("cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts"):
        try:
            facts["namespaces"][ns] = os.readlink(f"/proc/self/ns/{ns}")
        except OSError:
            pass
    return facts


def worker_key(environ: dict[str, str] | None = None, facts: dict | None = None) -> str:
    """The name of the worker that may serve this process (see the module doc)."""
    environ = key_environ(environ)
    facts = process_facts() if facts is None else facts
    key = json.dumps([sys.executable, sys.version, PACKAGE, sorted(environ.items()), facts], sort_keys=True)
    return _sha256_hex(key.encode())[:16]  # AF_UNIX paths are short; each request re-checks anyway


def socket_path() -> str | None:
    """The worker socket for this process; None: no safe place for one."""
    directory = private_dir()
    if directory is None:
        return None
    return os.path.join(directory, f"{worker_key()}.sock")


def peer_uid(conn: socket.socket) -> int | None:
    """The uid of the process listening on the other end of a connected Unix socket (Linux)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid


# ------------------------------------------------------------------------------ client

FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGCONT")
"""Signals a stage process passes on to the worker's child that runs it (SIGTSTP too: see _await_answer)."""


def delegate() -> int | None:
    """Run this stage process's script in the worker; its exit code, or None to run here."""
    if not enabled():
        return None
    facts = process_facts()
    directory = private_dir()
    if directory is None:  # no private directory for the socket: never talk to whatever is there
        return None
    path = os.path.join(directory, f"{worker_key(facts=facts)}.sock")
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(str(path))
    except OSError:
        spawn(path)
        return None
    try:
        if peer_uid(conn) != os.getuid():  # not our worker: send it nothing (no environment, no descriptors)
            return None
        header = json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ), "facts": facts}).encode()
        socket.send_fds(conn, [struct.pack("!I", len(header)) + header], [0, 1, 2])
        answer = _await_answer(conn)
    except (OSError, ValueError):  # a garbled answer: run here, as if the worker were gone
        return None
    finally:
        conn.close()
    if answer is None:  # worker gone before answering: run here (outputs are atomic, a rerun is safe)
        return None
    if answer.get("stale"):  # its sources changed since it started: it quits; the next stage starts a fresh one
        spawn(path)
        return None
    if answer.get("refused"):  # our settings are not the worker's after all: run here
        return None
    if os.environ.get("MINICHATGPT_WORKER_REPORT"):  # for benchmarks/: the stage's peak RSS
        print(f"[worker] {os.path.basename(sys.argv[0])} peak_rss_mb={answer.get('maxrss_kb', 0) / 1024:.1f}",
              file=sys.stderr, flush=True)
    return int(answer["code"])


def _await_answer(conn: socket.socket) -> dict | None:
    """Wait for the child's exit code, passing signals on to it meanwhile; None if the worker
    hung up. If this process's parent (``dvc``) dies, kill the child and die with it."""
    import signal

    parent = os.getppid()
    child = 0

    def forward(signum: int, frame: object) -> None:  # noqa: ARG001 - signal handler signature
        if signum == signal.SIGTSTP:  # stop the child, then ourselves as the default action would
            os.kill(child, signal.SIGSTOP)
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            os.kill(child, signum)

    conn.settimeout(0.2)
    buffer = b""
    while True:
        try:
            chunk = conn.recv(4096)
        except TimeoutError:
            if os.getppid() != parent:
                if child:
                    os.kill(child, signal.SIGKILL)
                os._exit(128 + signal.SIGKILL)
            continue
        if not chunk:
            return None
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            message = json.loads(line)
            if "pid" in message and not child:  # the child runs the stage from here on
                child = int(message["pid"])
                for name in (*FORWARDED, "SIGTSTP"):
                    signal.signal(getattr(signal, name), forward)
            else:
                return message


_reply_to: socket.socket | None = None
"""In a worker child: the connection of the stage process it runs for."""
served_at: float | None = None
"""In a worker child: when it took the request, after which it checked the worker's sources."""


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


def _starting(lock: str) -> bool:
    """Whether the worker recorded in a spawn lock is still starting (alive, and not for long)."""
    try:
        with open(lock) as f:
            pid = int(f.read() or 0)
        if time.time() - os.stat(lock).st_mtime > 120:
            return False
    except (OSError, ValueError):
        return False
    if not pid:
        return True  # its spawner has not written the pid yet
    from minichatgpt.runtime.host import pid_alive

    return pid_alive(pid)


def spawn(path: str) -> None:
    """Start a worker in the background (its own session, no stdio) for the next stages,
    unless one is already starting (it takes a few seconds to import before it listens)."""
    import subprocess

    lock = _spawn_lock(path)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            break
        except FileExistsError:
            if _starting(lock):
                return
            try:
                os.unlink(lock)  # a worker that died or never came up: start another
            except OSError:
                return
        except OSError:
            return
    else:
        return
    try:  # the stage's own environment: the worker's name (its key) stands for it
        proc = subprocess.Popen(
            [sys.executable, "-m", "minichatgpt.runtime.worker_server", path, PACKAGE, repr(time.time())],
            cwd="/", env=dict(os.environ), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
        )
        os.write(fd, str(proc.pid).encode())
    except OSError:
        pass
    finally:
        os.close(fd)
