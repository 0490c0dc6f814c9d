"""The warm worker gives a caller exactly what a cold process would, or does not serve it.

Each test runs a probe stage (``stages/probe.py`` in a copy of the package, so the worker that
serves it is private to the test module) that reports what it runs under."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minichatgpt.runtime import worker
from minichatgpt.runtime.hermetic import stage_environ
from tests.conftest import ROOT, tool_env
from tests.test_worker import socket_for

pytestmark = pytest.mark.slow  # stage processes and workers

PROBE = '''"""Reports the settings and code it runs under; waits for signals in --mode wait."""
import json, os, signal, time
from minichatgpt.runtime.stage import parser, run


def main():
    p = parser("probe", __doc__)
    p.add_argument("--mode", default="report")
    p.add_argument("--out", default="report.json")
    args = p.parse_args()
    from minichatgpt import core
    from minichatgpt.runtime.worker import IN_CHILD, key_environ, process_facts
    report = {"env": key_environ(), "facts": process_facts(), "marker": getattr(core, "PROBE_MARKER", None),
              "served": bool(os.environ.get(IN_CHILD))}
    with open(args.out, "w") as f:
        json.dump(report, f, sort_keys=True)
    if args.mode == "wait":
        def note(signum, frame):
            with open("signals", "a") as f:
                f.write(signal.Signals(signum).name + "\\n")
            if signum == signal.SIGTERM:
                os._exit(3)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, note)
        with open("pid", "w") as f:
            f.write(str(os.getpid()))
        for tick in range(600):
            with open("ticks", "w") as f:
                f.write(str(tick))
            time.sleep(0.05)
    if args.mode == "lazy":  # import a module the worker has not loaded, then write an output
        from minichatgpt.pipeline import report as lazy
        from minichatgpt.pipeline.artifacts import write_json
        write_json({"marker": getattr(lazy, "PROBE_MARKER", None)}, "lazy-output.json")
    if args.mode == "write":  # wait for "go", then write an output
        from minichatgpt.pipeline.artifacts import write_json
        with open("pid", "w") as f:
            f.write(str(os.getpid()))
        while not os.path.exists("go"):
            time.sleep(0.02)
        write_json({"written": True}, "output.json")
    return {"mode": args.mode}


if __name__ == "__main__":
    run("probe", main)
'''


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A checkout with its own copy of the package: its stages import that copy, so they get a
    worker of their own (the package directory is part of the worker's key)."""
    root = tmp_path_factory.mktemp("checkout")
    shutil.copytree(ROOT / "minichatgpt", root / "minichatgpt", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "stages").mkdir()
    (root / "stages" / "probe.py").write_text(PROBE)
    time.sleep(1.1)  # a worker refuses sources changed within a second of its start
    return root


def base_env(root: Path) -> dict[str, str]:
    return tool_env() | {"MINICHATGPT_WORKER": "1", "MINICHATGPT_WORKER_IDLE": "60", "MINICHATGPT_TEST_KEY": str(root)}


def probe(root: Path, env: dict[str, str], out: str = "report.json", preexec=None, mode: str = "report") -> dict:
    proc = subprocess.run([sys.executable, "stages/probe.py", "--mode", mode, "--out", out], cwd=root, env=env,
                          capture_output=True, text=True, preexec_fn=preexec, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads((root / out).read_text())


def wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert path.exists(), f"no worker came up at {path}"


def served(root: Path, env: dict[str, str], preexec=None) -> dict:
    """A probe run by the worker for these settings (started first if needed)."""
    sock = socket_for(env, str(root), preexec)
    if not sock.exists():
        probe(root, env, "spawn.json", preexec)
        wait_for(sock)
    report = probe(root, env, "served.json", preexec)
    assert report["served"], "the worker for these settings did not serve them"
    return report


def stop_workers(root: Path) -> None:
    subprocess.run(["pkill", "-f", f"minichatgpt.runtime.worker_server .* {root}/minichatgpt"], check=False)
    time.sleep(0.5)


def same(a: dict, b: dict) -> bool:
    """Equal but for how the stage ran (the worker switch itself, and who ran it)."""
    def strip(r: dict) -> dict:
        return {**r, "served": None, "env": {k: v for k, v in r["env"].items() if k != "MINICHATGPT_WORKER"}}
    return strip(a) == strip(b)


def lower_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))


def one_cpu() -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


CONDITIONS = {  # what a caller can set: (extra environment, preexec_fn, how the probe must see it)
    "environment": ({"HF_HOME": "/nonexistent/hf"}, None, lambda r: r["env"].get("HF_HOME") == "/nonexistent/hf"),
    "umask": ({}, lambda: os.umask(0o077), lambda r: r["facts"]["umask"] == 0o077),
    "nice": ({}, lambda: os.nice(5), lambda r: r["facts"]["nice"] >= 5),
    "rlimit": ({}, lower_nofile, lambda r: r["facts"]["rlimits"]["RLIMIT_NOFILE"][0] <= 512),
    "affinity": ({}, one_cpu, lambda r: len(r["facts"]["affinity"]) == 1),
}


@pytest.mark.parametrize("condition", list(CONDITIONS))
def test_a_caller_setting_is_seen_by_the_stage_as_in_a_cold_process(checkout: Path, condition: str) -> None:
    extra, preexec, seen = CONDITIONS[condition]
    if condition == "affinity" and len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: no other affinity to set")
    env = base_env(checkout)
    default = served(checkout, env)  # a worker for the default settings is up and serving
    changed_env = env | extra
    cold = probe(checkout, changed_env | {"MINICHATGPT_WORKER": "0"}, "cold.json", preexec)
    assert seen(cold) and not seen(default)
    first = probe(checkout, changed_env, "first.json", preexec)
    assert not first["served"], "the worker of other settings served this caller"
    assert same(first, cold)
    again = served(checkout, changed_env, preexec)  # a worker started under these settings serves them
    assert same(again, cold)


def test_the_key_covers_the_cgroup_and_every_other_fact() -> None:
    """A cgroup cannot be changed without privileges a test lacks: the key must change with it."""
    facts = worker.process_facts()
    base = worker.worker_key(facts=facts)
    for name in facts:
        other = json.loads(json.dumps(facts))
        other[name] = "something else"
        assert worker.worker_key(facts=other) != base, name
    assert worker.worker_key({**os.environ, "ANY_VARIABLE": "1"}, facts) != base
    for ignored in worker.KEY_IGNORED:  # proven not to matter: the re-exec marker, a report switch, idle time
        assert worker.worker_key({**os.environ, ignored: "x"}, facts) == worker.worker_key(dict(os.environ), facts)


def test_the_variables_left_out_of_the_key_are_read_only_by_the_stage_runtime() -> None:
    """What makes them safe to ignore: no stage code reads them (the re-exec marker is read by
    hermetic.enter, the report switch after the stage ended, the idle time by the worker loop)."""
    allowed = {"runtime/hermetic.py", "runtime/worker.py", "runtime/worker_server.py"}
    names = set(worker.KEY_IGNORED) | {"_REEXEC"}
    for file in sorted((ROOT / "minichatgpt").rglob("*.py")) + sorted((ROOT / "stages").glob("*.py")):
        text = file.read_text()
        relative = file.relative_to(ROOT / "minichatgpt").as_posix() if "minichatgpt" in file.parts else file.name
        if any(name in text for name in names):
            assert relative in allowed, f"{relative} reads a variable left out of the worker's key"


def test_an_edit_to_loaded_code_is_never_served_from_the_old_import(checkout: Path) -> None:
    env = base_env(checkout) | {"MINICHATGPT_TEST_CASE": "edit"}
    assert served(checkout, env)["marker"] is None
    core = checkout / "minichatgpt" / "core.py"
    original = core.read_text()
    try:
        core.write_text(original + "\nPROBE_MARKER = 1\n")
        after = probe(checkout, env, "after.json")
        assert after["marker"] == 1 and not after["served"]  # the worker is stale: this ran cold
        stop_workers(checkout)
        # edited while a new worker is importing: it must not serve what it half-imported
        probe(checkout, env | {"MINICHATGPT_WORKER": "1"}, "spawn.json")  # starts a worker, runs cold
        core.write_text(original + "\nPROBE_MARKER = 2\n")
        time.sleep(1.5)
        for _ in range(20):
            report = probe(checkout, env, "later.json")
            assert report["marker"] == 2, report
            if report["served"]:
                break
            time.sleep(1)
        assert report["served"], "no worker served the edited code in time"
    finally:
        core.write_text(original)
        stop_workers(checkout)


def test_the_worker_watches_every_loaded_library_file_and_distribution(checkout: Path) -> None:
    code = ("import importlib, json; from minichatgpt.runtime import worker_server as s\n"
            "[importlib.import_module(n) for n in s.PRELOAD]; print(json.dumps(s._watched()))")
    watched = json.loads(subprocess.run([sys.executable, "-c", code], env=stage_environ(tool_env(), str(checkout)),
                                        capture_output=True, text=True, check=True).stdout)
    names = {Path(f).name for f in watched}
    assert any(f.endswith("safetensors/torch.py") for f in watched)  # a library module, not only __init__.py
    assert any(n.startswith("libtorch_cpu") for n in names)  # a mapped shared library
    assert any("/torch-" in f and f.endswith(".dist-info/RECORD") for f in watched)  # its install record
    assert any(f.endswith("minichatgpt/core.py") for f in watched)


def pid_written(checkout: Path) -> bool:
    """The probe has written its pid (the file exists a moment before its content does)."""
    try:
        return (checkout / "pid").read_text().strip().isdigit()
    except FileNotFoundError:
        return False


def state_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # gone, or reaped between open and read (ESRCH)
        return "X"


def wait_until(check, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def test_signals_to_the_stage_reach_the_child_and_a_stop_stops_it(checkout: Path) -> None:
    env = base_env(checkout)
    served(checkout, env)
    for name in ("pid", "signals", "ticks"):
        (checkout / name).unlink(missing_ok=True)
    stage = subprocess.Popen([sys.executable, "stages/probe.py", "--mode", "wait", "--out", "wait.json"],
                             cwd=checkout, env=env, stderr=subprocess.PIPE, text=True)
    assert wait_until(lambda: pid_written(checkout), 60)
    child = int((checkout / "pid").read_text())
    assert child != stage.pid and json.loads((checkout / "wait.json").read_text())["served"]
    signals = checkout / "signals"
    for sig in (signal.SIGUSR1, signal.SIGINT, signal.SIGHUP):
        stage.send_signal(sig)
        assert wait_until(lambda sig=sig: signals.exists() and sig.name in signals.read_text()), sig.name
    stage.send_signal(signal.SIGSTOP)
    assert wait_until(lambda: state_of(child) == "T", 5), "the child runs on while the stage process is stopped"
    ticks = (checkout / "ticks").read_text()
    time.sleep(0.5)
    assert (checkout / "ticks").read_text() == ticks
    stage.send_signal(signal.SIGCONT)
    assert wait_until(lambda: (checkout / "ticks").read_text() != ticks, 5), "the child stayed stopped"
    stage.send_signal(signal.SIGTERM)
    assert stage.wait(timeout=20) == 3  # the child's exit code: it handled SIGTERM itself
    assert signals.read_text().split() == ["SIGUSR1", "SIGINT", "SIGHUP", "SIGTERM"]


@pytest.mark.parametrize("warm", [True, False], ids=["worker", "cold"])
def test_the_stage_and_its_child_die_when_dvc_dies(checkout: Path, warm: bool) -> None:
    env = base_env(checkout) | {"MINICHATGPT_WORKER": "1" if warm else "0"}
    if warm:
        served(checkout, env)
    (checkout / "pid").unlink(missing_ok=True)
    parent = subprocess.Popen(["sh", "-c", f"{sys.executable} stages/probe.py --mode wait --out dvc.json; true"],
                              cwd=checkout, env=env)  # stands for dvc: the stage's parent
    assert wait_until(lambda: pid_written(checkout), 60)
    runner = int((checkout / "pid").read_text())  # the child (worker) or the stage process itself (cold)
    stage = int(Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()[0])
    assert (runner != stage) == warm
    parent.kill()
    parent.wait()
    assert wait_until(lambda: state_of(stage) in ("X", "Z") and state_of(runner) in ("X", "Z"), 10), \
        "the stage outlived dvc"


def test_the_child_dies_when_the_stage_process_is_killed(checkout: Path) -> None:
    env = base_env(checkout)
    served(checkout, env)
    (checkout / "pid").unlink(missing_ok=True)
    stage = subprocess.Popen([sys.executable, "stages/probe.py", "--mode", "wait", "--out", "killed.json"],
                             cwd=checkout, env=env)
    assert wait_until(lambda: pid_written(checkout), 60)
    child = int((checkout / "pid").read_text())
    assert child != stage.pid
    stage.kill()  # SIGKILL: nothing in the stage process can pass it on
    stage.wait()
    assert wait_until(lambda: state_of(child) in ("X", "Z"), 10), "the child outlived its stage process"


@pytest.mark.parametrize("warm", [True, False], ids=["worker", "cold"])
def test_an_edit_while_the_stage_runs_stops_it_before_it_writes(checkout: Path, warm: bool) -> None:
    """DVC hashes the code after a stage: outputs of the code before an edit must not be written."""
    env = base_env(checkout) | {"MINICHATGPT_WORKER": "1" if warm else "0", "MINICHATGPT_TEST_CASE": "race"}
    if warm:
        served(checkout, env)
    for name in ("pid", "go", "output.json"):
        (checkout / name).unlink(missing_ok=True)
    core = checkout / "minichatgpt" / "core.py"
    original = core.read_text()
    stage = subprocess.Popen([sys.executable, "stages/probe.py", "--mode", "write", "--out", "race.json"],
                             cwd=checkout, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: pid_written(checkout), 60)
        assert json.loads((checkout / "race.json").read_text())["served"] == warm
        core.write_text(original + "\n# edited while the stage ran\n")
        (checkout / "go").touch()
        _, err = stage.communicate(timeout=60)
        assert stage.returncode == 2, err
        assert err.strip() == ("stage probe: minichatgpt/core.py: changed while this stage ran, so its outputs "
                               "would not be what the code on disk computes; nothing was written, run it again")
        assert not (checkout / "output.json").exists()
    finally:
        core.write_text(original)
        stop_workers(checkout)
        time.sleep(1.1)  # later tests' workers must not see a source younger than themselves


def test_an_edit_made_before_the_stage_started_is_run_not_refused(checkout: Path) -> None:
    """A module the worker never loaded, edited after its spare child was forked but before the
    stage: the child imports the edited file, which is what a cold process would run."""
    env = base_env(checkout) | {"MINICHATGPT_TEST_CASE": "lazy"}
    served(checkout, env)  # the worker is up and its next spare is forked
    module = checkout / "minichatgpt" / "pipeline" / "report.py"
    original = module.read_text()
    try:
        time.sleep(0.5)
        module.write_text(original + "\nPROBE_MARKER = 5\n")
        time.sleep(0.1)
        proc = subprocess.run([sys.executable, "stages/probe.py", "--mode", "lazy", "--out", "lazy.json"],
                              cwd=checkout, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert json.loads((checkout / "lazy.json").read_text())["served"]
        assert json.loads((checkout / "lazy-output.json").read_text()) == {"marker": 5}
    finally:
        module.write_text(original)
        stop_workers(checkout)
        time.sleep(1.1)
