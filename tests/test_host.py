"""The allocator setting's switch (its page-fault savings are a benchmark's business, not a test's)."""

from __future__ import annotations

import subprocess
import sys


def test_the_environment_switch_leaves_the_allocator_alone() -> None:
    code = ("import os; os.environ['MINICHATGPT_MALLOC'] = '0'; "
            "from minichatgpt.runtime.host import keep_freed_memory; print(keep_freed_memory())")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
