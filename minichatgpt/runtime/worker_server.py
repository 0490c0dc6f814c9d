"""Warm worker, server side: the long-lived process behind :mod:`minichatgpt.runtime.worker`.

It imports torch, transformers and this package once, then keeps one child forked
ahead of time ("spare") waiting on the socket, so a stage process's request costs
neither a fork (~25 ms with the libraries mapped) nor the worker's own bookkeeping:
the spare accepts the connection, checks that the sources it was forked with are
unchanged, hands the connection to the worker (which forks the next spare meanwhile
and watches for the stage process going away), and runs the stage.

Run as ``python -m minichatgpt.runtime.worker_server SOCKET PACKAGE`` by :func:`minichatgpt.runtime.worker.spawn`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import time

from minichatgpt.runtime import worker as client
from minichatgpt.runtime.worker import IN_CHILD, PACKAGE, _spawn_lock

STALE = 75
"""exit code of a spare that found the sources changed: the worker stops serving"""

PRELOAD = (
    # pq.read_table goes through pyarrow.dataset and imports pandas: 0.3 s in every stage child if not here
    "numpy", "pyarrow", "pyarrow.parquet", "pyarrow.dataset", "pyarrow.compute", "pyarrow.pandas_compat", "pandas",
    "yaml", "torch", "torch.profiler", "safetensors.torch", "tqdm.auto", "tokenizers",
    "transformers", "transformers.models.auto.modeling_auto", "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.bert.modeling_bert", "transformers.tokenization_utils_fast",
    "transformers.models.auto.tokenization_auto", "transformers.models.encoder_decoder.configuration_encoder_decoder",
    "minichatgpt.params", "minichatgpt.core", "minichatgpt.pipeline.artifacts", "minichatgpt.pipeline.data",
    "minichatgpt.pipeline.evaluation", "minichatgpt.models.policy", "minichatgpt.models.tokenizer",
    "minichatgpt.models.reward", "minichatgpt.ppo.generation", "minichatgpt.ppo.steps", "minichatgpt.ppo.update",
    "minichatgpt.runtime.stage", "minichatgpt.runtime.host", "minichatgpt.runtime.device",
)


def _watched() -> list[str]:
    """Every source this process has loaded: module files, mapped files (shared libraries), and
    the install record of each distribution they belong to (an upgrade replaces it)."""
    files = {file for mod in list(sys.modules.values()) if isinstance(file := getattr(mod, "__file__", None), str)}
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(None, 5)
                if len(fields) == 6 and fields[5].startswith("/") and not fields[5].rstrip().endswith("(deleted)"):
                    files.add(fields[5].rstrip("\n"))
    except OSError:
        pass
    try:
        from importlib.metadata import distribution, packages_distributions

        loaded = {name.partition(".")[0] for name in sys.modules}
        names = {dist for top, dists in packages_distributions().items() if top in loaded for dist in dists}
        for name in names:
            path = getattr(distribution(name), "_path", None)  # its .dist-info directory
            if path is not None:
                files.add(os.path.join(str(path), "RECORD"))
    except Exception:  # noqa: BLE001 - metadata is extra: module and library files are watched regardless
        pass
    return sorted(f for f in files if not f.startswith(("/dev/", "/proc/", "/sys/")))


def _stat(files: list[str]) -> list[tuple[int, int, int, int]]:
    """Inode, size, mtime and ctime of each file: any change makes the worker stale."""
    out = []
    for file in files:
        try:
            st = os.stat(file)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        except OSError:
            out.append((-1, -1, -1, -1))
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


def _become_stage(request: dict, fds: list[int], conn: socket.socket) -> None:
    """In a child: become the stage process and run its script; answers ``conn``, never returns."""
    code = 1
    try:
        client._reply_to = conn  # the stage script's run() ends with client.finish(), which answers
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
        client.finish(code)


def _spare(worker: int, listener: socket.socket, channel: socket.socket, watched: list[str], snapshot: list,
           settings: tuple[dict, dict], close: list) -> None:
    """A child forked ahead of time by process ``worker``: wait for the next stage process, then
    become it; never returns."""
    try:
        _die_with_parent()
        if os.getppid() != worker:  # the worker died before PR_SET_PDEATHSIG took hold
            os._exit(0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for obj in close:  # the worker's selector, its end of the channel and other stages' connections
            obj.close()
        conn, _ = listener.accept()
        listener.close()
        if client.peer_uid(conn) != os.getuid():  # only our own stages (the directory is ours alone anyway)
            os._exit(1)
        stage_pid = _peer_pid(conn)
        request, fds = _recv_request(conn)
        client.served_at = time.time()  # the stage's start: sources unchanged up to here (checked next)
        if _stat(watched) != snapshot:  # code changed under the worker: let the client run it cold
            conn.sendall(b'{"stale": true}\n')
            os._exit(STALE)
        if request.get("facts") != settings[0] or client.key_environ(request.get("env", {})) != settings[1]:
            conn.sendall(b'{"refused": "settings"}\n')  # the socket's name says otherwise: never serve it
            os._exit(1)
        conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")  # signals to the stage reach us
        # the worker keeps a copy of the connection: it answers if this process dies
        # without answering, and kills it if the stage process goes away
        socket.send_fds(channel, [f"{os.getpid()} {stage_pid}".encode()], [conn.fileno()])
        channel.close()
    except BaseException:  # noqa: BLE001 - a broken request: the client sees EOF and runs the stage itself
        os._exit(1)
    _become_stage(request, fds, conn)


def _peer_pid(conn: socket.socket) -> int:
    pid, _uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid


def _process_state(pid: int) -> str:
    """The state letter of a process (R, S, T stopped, Z, ...); X if it is gone."""
    stat = client._read(f"/proc/{pid}/stat")
    return stat.rpartition(")")[2].split()[0] if stat else "X"


def _mirror_stop(stages: dict[int, int]) -> None:
    """Keep each child stopped exactly while its stage process is (SIGSTOP cannot be caught and
    passed on by the stage process; checked every 50 ms while stages run)."""
    for child, stage in stages.items():
        stopped, child_stopped = _process_state(stage) == "T", _process_state(child) == "T"
        if stopped != child_stopped:
            try:
                os.kill(child, signal.SIGSTOP if stopped else signal.SIGCONT)
            except ProcessLookupError:
                pass


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
    import tempfile

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


def load() -> None:
    """Everything the server does before it forks children: imports and the warm-up. None of it may
    initialise CUDA (not even ask how many GPUs there are): a CUDA context does not survive fork, so
    the children, which resolve ``runtime.device``, could not use the GPU (tests/test_device.py)."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    try:
        _warm_up()
    except Exception:  # noqa: BLE001 - only a speed-up; children load models themselves anyway
        pass


def serve(path: str, idle_s: float, started: float) -> None:
    """Import, then serve on ``path``; ``started`` is when the stage process that spawned this
    worker decided to (a source changed after that may be half-imported: never serve then)."""
    import selectors

    settings = (json.loads(json.dumps(client.process_facts())), client.key_environ())  # as a request has them
    if os.path.basename(path) != f"{client.worker_key(facts=settings[0])}.sock":
        return  # not the settings the name stands for (the spawner's differ from ours): serve nobody
    load()
    watched = _watched()
    snapshot = _stat(watched)
    if any(ctime >= (started - 1.0) * 1e9 for _, _, _, ctime in snapshot):
        _unlink(_spawn_lock(path))  # changed while we imported (or just before): the next stage spawns afresh
        return
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}")
    _unlink(tmp)
    listener.bind(tmp)
    os.chmod(tmp, 0o600)
    listener.listen(16)
    inode = os.stat(tmp).st_ino
    os.replace(tmp, path)  # atomically take over the name (a racing worker just idles out)
    _unlink(_spawn_lock(path))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    sel = selectors.DefaultSelector()
    sel.register(ours, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}  # running stages: pid -> the stage process's connection
    stages: dict[int, int] = {}  # running stages: pid -> the stage process's pid
    spare = 0
    me = os.getpid()
    serving = True
    last = time.monotonic()
    try:
        while serving or children:
            if serving and not spare:
                spare = os.fork()
                if spare == 0:
                    _spare(me, listener, theirs, watched, snapshot, settings, [sel, ours, *children.values()])
            for key, _ in sel.select(timeout=0.05 if children else 1.0):
                if key.fileobj is ours:  # the spare took a request: it is a running stage now
                    msg, fds, _, _ = socket.recv_fds(ours, 32, 1)
                    if not fds:
                        continue
                    pid, stage = map(int, msg.split())
                    stages[pid] = stage
                    children[pid] = conn = socket.socket(fileno=fds[0])
                    sel.register(conn, selectors.EVENT_READ, pid)
                    spare = 0 if pid == spare else spare
                    last = time.monotonic()
                elif not key.fileobj.recv(1):  # the stage process hung up or was killed: so is its child
                    _kill(key.data)
                    sel.unregister(key.fileobj)
            while True:
                try:
                    pid, status, usage = os.wait4(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                code = os.waitstatus_to_exitcode(status)
                if pid == spare:  # stale, a broken request, or killed
                    spare = 0
                    serving = serving and code != STALE
                stages.pop(pid, None)
                conn = children.pop(pid, None)
                if conn is not None:
                    _answer(conn, 128 - code if code < 0 else code, usage.ru_maxrss)  # harmless if answered
                    try:
                        sel.unregister(conn)
                    except (KeyError, ValueError):
                        pass
                    conn.close()
                last = time.monotonic()
            _mirror_stop(stages)
            if serving and not children and time.monotonic() - last > idle_s:
                serving = False
            if not serving and listener.fileno() >= 0:  # no new stages: give the name back, drop the spare
                _unlink_own(path, inode)
                listener.close()
                if spare:
                    _kill(spare)
    finally:  # idle, stale, or SIGTERM
        _unlink_own(path, inode)
        if spare:
            _kill(spare)


def _answer(conn: socket.socket, code: int, maxrss_kb: int) -> None:
    try:
        conn.sendall(json.dumps({"code": code, "maxrss_kb": maxrss_kb}).encode() + b"\n")
    except OSError:
        pass


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _unlink_own(path: str, inode: int) -> None:
    """Remove the socket name unless a newer worker has taken it over."""
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass


def _terminate(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    raise SystemExit(0)


if __name__ == "__main__":
    sock_path, package, spawned = sys.argv[1], os.path.realpath(sys.argv[2]), float(sys.argv[3])
    if package != PACKAGE:  # resolved another copy of the package than the client's
        sys.exit(0)
    signal.signal(signal.SIGTERM, _terminate)  # children reset it; the worker removes its socket name
    serve(sock_path, float(os.environ.get("MINICHATGPT_WORKER_IDLE", "300")), spawned)
