"""Each stage's params are exactly the settings it reads: `params:` in dvc.yaml for the one-off
stages, minichatgpt.pipeline.inputs.STAGE_PARAMS (what data/inputs/<stage>.json records) for the
iteration stages.

Every stage is run in-process on the tiny pipeline with the settings objects swapped for ones
that record which fields are read (by the stage script or any library code it calls). A
setting read but not listed would let DVC restore outputs computed with another value; one
listed but not read reruns the stage for nothing.
"""

from __future__ import annotations

import dataclasses
import os
import runpy
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from minichatgpt import params as params_module
from minichatgpt.pipeline.inputs import STAGE_PARAMS
from tests.conftest import pipeline_stages

pytestmark = pytest.mark.e2e

STAGE_DEFS = pipeline_stages()


def recorded(obj: object, prefix: str, reads: set[str]) -> object:
    """``obj`` (a settings dataclass) as an instance that adds ``prefix.field`` to ``reads`` on access."""
    fields = {f.name for f in dataclasses.fields(obj)}

    class Recording(type(obj)):
        def __getattribute__(self, name: str):
            if name in fields:
                reads.add(f"{prefix}.{name}")
            return object.__getattribute__(self, name)

    copy = object.__new__(Recording)
    copy.__dict__.update(obj.__dict__)
    return copy


def listed_params(name: str, stage: dict) -> tuple[set[str], set[str]]:
    """(keys listed one by one, sections listed whole) of a stage."""
    keys, sections = set(), set()
    for entry in STAGE_PARAMS.get(name) or stage.get("params", []):
        name = next(iter(entry)) if isinstance(entry, dict) else entry
        (keys if "." in name else sections).add(name)
    return keys, sections


def argv_of(stage: dict) -> list[str]:
    """The stage's argv, without --inputs: its check reads every setting the file records (and
    the variants below change params.yaml after check_params wrote it)."""
    cmd = stage["cmd"].replace("${runtime.launcher}", "python").replace("${key}", "1").replace("${item.prev}", "0")
    argv = shlex.split(cmd)[1:]
    if "--inputs" in argv:
        at = argv.index("--inputs")
        del argv[at:at + 2]
    return argv


@pytest.fixture(scope="module")
def run_copy(pipeline_repo: Path, tmp_path_factory) -> Path:
    """A copy of the reproduced tiny pipeline, so that in-process reruns touch nothing shared."""
    copy = tmp_path_factory.mktemp("params-read") / "repo"
    shutil.copytree(pipeline_repo, copy, symlinks=True)
    return copy


STAGES = [name for name in STAGE_DEFS if name != "check_params"]  # check_params reads the whole file
VARIANTS = {"update": [{"ppo": {"early_stopping": True}}]}
"""Settings that switch on reading others (ppo.target_kl is read only with early stopping)."""


@pytest.mark.parametrize("name", STAGES)
def test_stage_params_are_the_settings_it_reads(name: str, run_copy: Path, monkeypatch) -> None:
    stage = STAGE_DEFS[name]
    stage = stage.get("do", stage)
    reads: set[str] = set()
    real_section = params_module.section

    def section(raw: dict, which: str):  # (params.iterations reads ppo.iterations through it too)
        return recorded(real_section(raw, which), which, reads)

    monkeypatch.setattr(params_module, "section", section)
    monkeypatch.chdir(run_copy)
    argv = argv_of(stage)
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setenv("MINICHATGPT_WORKER", "0")
    params_file = run_copy / "params.yaml"
    original = params_file.read_text()
    try:
        for variant in [{}] + VARIANTS.get(name, []):
            raw = yaml.safe_load(original)
            for section_name, values in variant.items():
                raw[section_name].update(values)
            params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
            runpy.run_path(str(run_copy / argv[0]), run_name="stage_under_test")["main"]()
    finally:
        params_file.write_text(original)
    assert reads, f"{name} read no settings"

    keys, sections = listed_params(name, stage)
    unlisted = sorted(r for r in reads if r not in keys and r.split(".")[0] not in sections)
    assert not unlisted, f"stage {name} reads {unlisted} without listing them"
    unread = sorted(k for k in keys if k not in reads)
    assert not unread, f"stage {name} lists {unread} but never reads them"
    assert os.getcwd() == str(run_copy)
