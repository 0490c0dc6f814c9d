"""The dvclive report and the offline `dvc plots show` page (no pipeline run needed)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from minichatgpt.report import iteration_series, offline_html_template, reward_histogram, write_live


def test_reward_histogram_counts_each_prompt_once_on_shared_edges() -> None:
    rng = np.random.default_rng(0)
    before, after = rng.normal(-0.5, 0.3, 500), rng.normal(0.4, 0.2, 300)
    rows = reward_histogram(before, after, bins=10)
    assert len(rows) == 10
    assert sum(r["before"] for r in rows) == pytest.approx(1.0, abs=1e-5)
    assert sum(r["after"] for r in rows) == pytest.approx(1.0, abs=1e-5)
    centers = [r["reward"] for r in rows]
    assert centers == sorted(centers)
    # the lowest bin holds the minimum of `before`; the highest the maximum of `after`
    width = centers[1] - centers[0]
    assert centers[0] - width / 2 == pytest.approx(min(before.min(), after.min()), abs=1e-5)
    assert rows[-1]["after"] > 0 and rows[0]["before"] > 0
    # identical scores still give one finite bin
    flat = reward_histogram(np.zeros(4), np.zeros(4), bins=3)
    assert flat[0]["before"] == 1.0 and flat[0]["after"] == 1.0


def test_iteration_series_keeps_logged_keys_in_iteration_order() -> None:
    stats = {"10": {"env/reward_mean": 1.0, "loss/total": 3.0, "time/ppo/total": 2.0},
             "2": {"env/reward_mean": 0.5, "iter": 2}}
    series = iteration_series(stats)
    assert list(series) == [2, 10]  # numeric, not string, order
    assert series[10] == {"env/reward_mean": 1.0, "time/ppo/total": 2.0}
    assert series[2] == {"env/reward_mean": 0.5}


def test_write_live_logs_one_row_per_iteration(tmp_path) -> None:
    series = {1: {"env/reward_mean": -0.1, "objective/kl": 0.0}, 2: {"env/reward_mean": 0.2, "objective/kl": 1.5}}
    summary = {"reward_before": -0.1, "reward_after": 0.3, "reward_stderr": 0.01, "kl": 2.0, "kl_stderr": 0.1}
    write_live(tmp_path / "live", series, summary, [{"reward": 0.0, "before": 0.5, "after": 0.5}])
    tsv = (tmp_path / "live/plots/metrics/env/reward_mean.tsv").read_text().split()
    assert tsv == ["step", "reward_mean", "1", "-0.1", "2", "0.2"]
    metrics = json.loads((tmp_path / "live/metrics.json").read_text())
    assert metrics["objective"]["kl"] == 1.5 and metrics["eval"]["reward_after"] == 0.3 and metrics["step"] == 2
    assert not (tmp_path / "live/dvc.yaml").exists()  # dvc.yaml is the project's, not dvclive's


def test_offline_template_inlines_vega_and_keeps_dvc_placeholders() -> None:
    page = offline_html_template()
    assert page.count("{plot_divs}") == 1 and "{scripts}" not in page
    assert not re.search(r"<script[^>]*\bsrc=", page)
    assert "window.vegaEmbed" in page and page.count("</script>") == 1
