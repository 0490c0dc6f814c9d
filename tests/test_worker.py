"""The warm stage worker: same bytes as a cold stage process, same refusals, clean fallback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from minichatgpt.pipeline.artifacts import write_table
from minichatgpt.runtime.hermetic import stage_environ
from tests.conftest import ROOT, TINY_PARAMS, tool_env
from tests.test_stages import scored_table

pytestmark = pytest.mark.slow  # stage processes and a worker per test


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    # a private worker for this test (the key includes MINICHATGPT_* variables), gone soon after
    return tool_env() | {"MINICHATGPT_TEST_KEY": str(tmp_path), "MINICHATGPT_WORKER_IDLE": "30",
                         "MINICHATGPT_WORKER_REPORT": "1", "MINICHATGPT_WORKER": "1"} | extra


def socket_for(env: dict[str, str], root: str | None, preexec=None) -> Path:
    """The socket of the worker that serves a stage process started with ``env`` (and ``preexec``)
    from this process, for a script in checkout ``root``: computed by a process set up alike, run in
    ``root`` so that it imports that checkout's package (``python -c`` puts its cwd first on sys.path)."""
    return Path(subprocess.run([sys.executable, "-c", "from minichatgpt.runtime.worker import socket_path; "
                                "print(socket_path())"], env=stage_environ(env, root), cwd=root, preexec_fn=preexec,
                               capture_output=True, text=True, check=True).stdout.strip())


def advantages(tmp_path: Path, out: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "stages/advantages.py"), "--iter", "1", "--scored", "scored.parquet",
         "--out", out], cwd=tmp_path, env=env, capture_output=True, text=True)


def test_a_stage_run_by_the_worker_writes_the_bytes_of_a_cold_run_and_refuses_alike(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    write_table(scored_table(), tmp_path / "scored.parquet", "scored")
    env = env_for(tmp_path)
    cold = advantages(tmp_path, "cold.parquet", env | {"MINICHATGPT_WORKER": "0"})
    assert cold.returncode == 0, cold.stderr
    sock = socket_for(env, str(ROOT))
    first = advantages(tmp_path, "first.parquet", env)  # no worker yet: runs here, starts one
    assert first.returncode == 0, first.stderr
    assert "[worker]" not in first.stderr
    deadline = time.monotonic() + 120
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sock.exists(), "the worker did not come up"

    warm = advantages(tmp_path, "warm.parquet", env)
    assert warm.returncode == 0, warm.stderr
    assert "[worker] advantages.py" in warm.stderr  # served by the worker's child (its report line)
    assert "[advantages] done in" in warm.stderr  # the stage's own log reached our stderr
    for name in ("first.parquet", "warm.parquet"):
        assert (tmp_path / name).read_bytes() == (tmp_path / "cold.parquet").read_bytes()

    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["ppo"]["lam"] = 1.5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    refused = advantages(tmp_path, "bad.parquet", env)
    assert refused.returncode == 2
    assert refused.stderr.splitlines()[0].startswith("stage advantages: ") and "ppo.lam=1.5" in refused.stderr
    assert not (tmp_path / "bad.parquet").exists()


SCRIPT = '''
import os, signal, sys, time
from minichatgpt.runtime.stage import parser, run

def main():
    p = parser("probe", "A stage that reports its pid, then sleeps, dies or returns.")
    p.add_argument("--mode", required=True)
    args = p.parse_args()
    with open("pid." + args.mode, "w") as f:
        f.write(str(os.getpid()))
    if args.mode == "sleep":
        time.sleep(30)
        open("finished", "w").close()
    elif args.mode == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    return {"mode": args.mode}

if __name__ == "__main__":
    run("probe", main)
'''


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):  # (reaped between the two, or between open and read)
        return False


def test_the_worker_kills_the_child_of_a_killed_stage_and_reports_a_child_killed_by_a_signal(tmp_path: Path) -> None:
    (tmp_path / "probe.py").write_text(SCRIPT)
    env = env_for(tmp_path)

    def probe(mode: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "probe.py", "--mode", mode], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    sock = socket_for(env, None)
    assert probe("return").wait() == 0  # no worker yet: runs here, starts one
    deadline = time.monotonic() + 120
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sock.exists(), "the worker did not come up"
    for _ in range(2):  # each request is served by a child forked ahead of time, and replaced
        served = probe("return")
        _, err = served.communicate(timeout=60)
        assert served.returncode == 0 and "[worker] probe.py" in err, err
        assert int((tmp_path / "pid.return").read_text()) != served.pid  # ran in the worker's child

    stage = probe("sleep")
    deadline = time.monotonic() + 60
    pid_file = tmp_path / "pid.sleep"
    while not (pid_file.exists() and pid_file.read_text().strip()):  # created a moment before it is written
        assert time.monotonic() < deadline, "the stage did not start"
        time.sleep(0.05)
    child = int((tmp_path / "pid.sleep").read_text())
    assert child != stage.pid and alive(child)
    stage.send_signal(signal.SIGTERM)  # e.g. dvc repro interrupted
    stage.wait(timeout=10)
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child), "the worker left the stage's child running"
    assert not (tmp_path / "finished").exists()

    died = probe("die")
    _, err = died.communicate(timeout=60)
    assert died.returncode == 128 + signal.SIGKILL, err  # as a shell reports a process killed by SIGKILL
    served = probe("return")  # and the worker still serves the next stage
    _, err = served.communicate(timeout=60)
    assert served.returncode == 0 and "[worker] probe.py" in err, err


SQUATTER = '''
import os, socket, sys
path = sys.argv[1]
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(path)
os.chmod(path, 0o777)
os.setgid(65534)
os.setuid(65534)  # before listen(): a client's SO_PEERCRED then names this uid
listener.listen(4)
print("ready", flush=True)
listener.settimeout(float(sys.argv[2]))
received = 0
try:
    conn, _ = listener.accept()
    conn.settimeout(5)
    while chunk := conn.recv(65536):
        received += len(chunk)
except OSError:
    pass
print(received, flush=True)
'''


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="needs root to act as a second uid")
@pytest.mark.parametrize("where", ["their directory", "our directory"])
def test_a_squatter_of_another_uid_receives_nothing_and_the_stage_still_runs(tmp_path: Path, where: str) -> None:
    """Another user bound the worker's socket name: in a directory they own (the client refuses the
    directory), or, as root could, in ours (the client checks the listener's uid and sends nothing)."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    write_table(scored_table(), tmp_path / "scored.parquet", "scored")
    env = env_for(tmp_path, TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir(mode=0o1777)
    sock = socket_for(env, str(ROOT))
    assert sock.parent.stat().st_mode & 0o777 == 0o700 and sock.parent.stat().st_uid == os.getuid()
    if where == "their directory":
        sock.parent.rmdir()
        sock.parent.mkdir(mode=0o777)
        os.chmod(sock.parent, 0o777)
        os.chown(sock.parent, 65534, 65534)
    squatter = subprocess.Popen([sys.executable, "-c", SQUATTER, str(sock), "20"], stdout=subprocess.PIPE, text=True)
    assert squatter.stdout.readline().strip() == "ready"
    assert advantages(tmp_path, "cold.parquet", env | {"MINICHATGPT_WORKER": "0"}).returncode == 0
    run = advantages(tmp_path, "out.parquet", env)
    if where == "their directory":
        squatter.send_signal(signal.SIGINT)
    received = squatter.communicate(timeout=60)[0].strip().splitlines()
    assert run.returncode == 0, run.stderr
    assert "[worker]" not in run.stderr and "[advantages] done in" in run.stderr  # ran here, in its own process
    assert (tmp_path / "out.parquet").read_bytes() == (tmp_path / "cold.parquet").read_bytes()
    assert received in ([], ["0"]), f"the squatter received {received} bytes"
