"""The allocator setting that keeps a PPO step from page-faulting its buffers in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from minichatgpt.runtime.host import keep_freed_memory
tuned = keep_freed_memory() if sys.argv[1] == "1" else False
def step():  # the reference pass's logits at the default forward_batch_size: ~1250 tokens x 8192
    return float(torch.empty(1250, 8192).fill_(1.0)[0, 0])
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(tune: bool) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if tune else "0"], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tunes glibc only")
def test_kept_memory_stops_the_page_faults_of_repeated_large_buffers() -> None:
    tuned, with_tuning = faults(True)
    untuned, without = faults(False)
    assert tuned == "True" and untuned == "False"
    assert without > 20 * 9_000  # glibc maps each 40 MB buffer afresh: ~10,000 page faults per step
    assert with_tuning < without / 2, (with_tuning, without)


def test_the_environment_switch_leaves_the_allocator_alone() -> None:
    code = "import os; os.environ['MINICHATGPT_MALLOC'] = '0'; from minichatgpt.runtime.host import keep_freed_memory; " \
           "print(keep_freed_memory())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
