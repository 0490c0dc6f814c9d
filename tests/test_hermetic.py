"""Hermetic stages: an output's bytes depend on code, params and inputs only, never on the caller's
environment or the CPU's instruction set, so DVC's hashes and run-cache can be trusted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from minichatgpt.runtime import hermetic
from tests.conftest import TINY_PARAMS, metrics_of, out_hashes, sh, stages_run, tool_env

ROOT = Path(__file__).resolve().parents[1]


def test_stage_environ_keeps_locations_drops_settings_and_pins_kernels() -> None:
    caller = {"PATH": "/bin", "HOME": "/home/u", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "7", "LANG": "de_DE.UTF-8",
              "MKL_CBWR": "AVX512", "ATEN_CPU_CAPABILITY": "avx512", "TRANSFORMERS_VERBOSITY": "debug",
              "PYTHONHASHSEED": "123", "DVC_EXP_NAME": "x", "TZ": "Asia/Tokyo", "AWS_SECRET_ACCESS_KEY": "s"}
    env = hermetic.stage_environ(caller)
    assert env["PATH"] == "/bin" and env["HOME"] == "/home/u" and env["HF_HUB_OFFLINE"] == "1"
    for dropped in ("LANG", "TRANSFORMERS_VERBOSITY", "DVC_EXP_NAME", "TZ", "AWS_SECRET_ACCESS_KEY"):
        assert dropped not in env
    assert env["OMP_NUM_THREADS"] == "1" and env["MKL_CBWR"] == "COMPATIBLE"
    assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["PYTHONHASHSEED"] == "0"
    assert hermetic.stage_environ(env) == env  # a stage already under it is not re-executed


def test_a_stage_process_sees_only_the_stage_environment(tmp_path: Path) -> None:
    script = tmp_path / "stages" / "show_env.py"
    script.parent.mkdir()
    script.write_text(
        "import json, os, sys\n"
        "from minichatgpt.runtime.stage import parser, run\n"
        "def main():\n"
        "    parser('show_env', 'print the environment').parse_args()\n"
        "    print(json.dumps({'env': dict(os.environ), 'pid': os.getpid()}))\n"
        "run('show_env', main)\n")
    env = tool_env() | {"ATEN_CPU_CAPABILITY": "avx512", "LANG": "C", "SECRET": "x", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    import json

    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["pid"] == proc.pid  # re-executed in place: DVC still waits on the same process
    expected = hermetic.stage_environ(env)
    assert {k: v for k, v in seen["env"].items() if not k.startswith("_MINICHATGPT")} == {
        k: v for k, v in expected.items() if not k.startswith("_MINICHATGPT")}


PROBE = ("import hashlib, torch; torch.manual_seed(0); x = torch.randn(64, 4099); w = torch.randn(4099, 515);"
         "y = torch.log_softmax(x @ w, -1).sum(0);"
         "print(torch.backends.cpu.get_cpu_capability(), hashlib.sha256(y.numpy().tobytes()).hexdigest())")


def probe(env: dict[str, str]) -> tuple[str, str]:
    base = {k: v for k, v in tool_env().items() if k not in hermetic.PINNED}
    out = subprocess.run([sys.executable, "-c", PROBE], env=base | env, capture_output=True, text=True, check=True)
    level, digest = out.stdout.split()
    return level, digest


def capability_levels() -> list[dict[str, str]]:
    """The instruction-set levels this CPU offers, as the knobs a machine of that level would leave unset."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    levels = [{"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"}]
    if re.search(r"\bavx2\b", flags):
        levels.append({"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"})
    if re.search(r"\bavx512f\b", flags):
        levels.append({"ATEN_CPU_CAPABILITY": "avx512", "MKL_CBWR": "AVX512", "ONEDNN_MAX_CPU_ISA": "ALL"})
    return levels


@pytest.mark.slow
def test_the_cpu_levels_change_unpinned_results() -> None:
    """The control for the pipeline test below: on this CPU the levels really give different bytes."""
    results = {probe(level) for level in capability_levels()}
    assert len(results) == len(capability_levels()) >= 2


@pytest.mark.e2e
@pytest.mark.parametrize("level", range(len(capability_levels())),
                         ids=[lv["ATEN_CPU_CAPABILITY"] for lv in capability_levels()])
def test_forced_rerun_under_any_caller_environment_and_cpu_level_is_bit_identical(pipeline_repo: Path,
                                                                                   level: int) -> None:
    """`dvc repro --force` from a caller whose every setting differs (HF_HUB_OFFLINE unset, threads,
    locale, hash seed, temp dir, and the SIMD level each library would pick) reproduces every hash."""
    recorded = out_hashes(pipeline_repo, "HEAD")
    metrics = metrics_of(pipeline_repo)
    env = {k: v for k, v in tool_env().items() if k != "HF_HUB_OFFLINE"} | capability_levels()[level] | {
        "OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3", "LANG": "de_DE.UTF-8", "TZ": "Asia/Tokyo",
        "PYTHONHASHSEED": "123", "TRANSFORMERS_VERBOSITY": "debug", "TMPDIR": str(pipeline_repo / ".git")}
    run = subprocess.run(["dvc", "repro", "--force"], cwd=pipeline_repo, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert out_hashes(pipeline_repo) == recorded
    assert metrics_of(pipeline_repo) == metrics
    assert "up to date" in sh(["dvc", "status"], pipeline_repo).stdout


RECOVERY = [line.split("$ ", 1)[1] for line in (ROOT / "README.md").read_text().splitlines()
            if line.startswith("$ git rm") or line.startswith("$ dvc checkout")]
"""The README's commands that undo a refused `dvc exp run -S` (as the README shows them)."""


@pytest.mark.e2e
def test_repeating_an_experiment_restores_every_stage_from_the_run_cache(pipeline_repo: Path) -> None:
    try:
        sh(["dvc", "exp", "run", "-S", "ppo.lam=0.8"], pipeline_repo)
        again = sh(["dvc", "exp", "run", "-S", "ppo.lam=0.8"], pipeline_repo)
        assert stages_run(again.stdout) == set(), again.stdout
        back = sh(["dvc", "exp", "run", "-S", f"ppo.lam={TINY_PARAMS['ppo']['lam']}"], pipeline_repo)
        assert stages_run(back.stdout) == {"check_params"}, back.stdout  # kept out of the run-cache (dvc.yaml)
        assert "Stage 'evaluate' is cached" in back.stdout and "dvc.yaml:update@2' is cached" in back.stdout
    finally:
        sh(["git", "rm", "-q", "--cached", "params.yaml"], pipeline_repo)
        sh(["git", "checkout", "HEAD", "--", "."], pipeline_repo)
        sh(["dvc", "checkout", "--force"], pipeline_repo)


@pytest.mark.e2e
@pytest.mark.parametrize(("setting", "needle"), [
    ("ppo.cliprange=0", "ppo.cliprange=0.0 is not allowed; expected > 0"),
    ("+ppo.lr=1e-4", "unknown key ppo.lr; did you mean ppo.learning_rate?"),
    ("+runtime.thread=4", "unknown key runtime.thread; did you mean runtime.threads?"),
    ("ppo.iterations=0", "ppo.iterations=0 is not allowed; expected >= 1"),
    ("generation.output_max_length=60", "generation.output_max_length=60 is not allowed; expected <= "),
])
def test_a_refused_param_deletes_nothing_and_the_readme_recovery_is_clean(pipeline_repo: Path, setting, needle):
    tracked = ("data", "checkpoints", "models", "metrics", "runs")
    before = {str(p): p.read_bytes() for d in tracked for p in sorted((pipeline_repo / d).rglob("*")) if p.is_file()}
    run = sh(["dvc", "exp", "run", "-S", setting], pipeline_repo, check=False)
    assert len(RECOVERY) == 2
    try:
        assert run.returncode != 0
        assert stages_run(run.stdout + run.stderr) == {"check_params"}
        assert needle in run.stdout + run.stderr
        for command in RECOVERY:  # the README's recovery, verbatim
            subprocess.run(command, shell=True, cwd=pipeline_repo, env=tool_env(), check=True)
        after = {str(p): p.read_bytes() for d in tracked for p in sorted((pipeline_repo / d).rglob("*"))
                 if p.is_file()}
        assert after == before
        assert "up to date" in sh(["dvc", "status"], pipeline_repo).stdout
    finally:
        sh(["git", "rm", "-q", "--cached", "params.yaml"], pipeline_repo)
        sh(["git", "checkout", "HEAD", "--", "."], pipeline_repo)
        sh(["dvc", "checkout", "--force"], pipeline_repo)


def test_a_saved_tokenizer_holds_no_load_time_settings(tmp_path: Path) -> None:
    """transformers writes how a tokenizer was loaded (local_files_only, from HF_HUB_OFFLINE) back into
    tokenizer_config.json; a checkpoint must hold the same bytes however its input was loaded."""
    from transformers import AutoTokenizer

    from minichatgpt.models.tokenizer import save_tokenizer, train_bpe_tokenizer

    save_tokenizer(train_bpe_tokenizer(["a good film", "a bad film"] * 20, 300), tmp_path / "first")
    written = []
    for offline in (True, False):
        loaded = AutoTokenizer.from_pretrained(tmp_path / "first", local_files_only=offline)
        save_tokenizer(loaded, tmp_path / str(offline))
        written.append((tmp_path / str(offline) / "tokenizer_config.json").read_bytes())
    assert written[0] == written[1] == (tmp_path / "first" / "tokenizer_config.json").read_bytes()
    assert b"local_files_only" not in written[0]
