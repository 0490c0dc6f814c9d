"""The plot data `evaluate` writes and the offline `dvc plots show` page (no pipeline run needed)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from minichatgpt.pipeline.report import iteration_rows, offline_html_template, reward_histogram
from tests.conftest import ROOT


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


def test_iteration_rows_are_in_iteration_order_with_plot_field_names() -> None:
    stats = {"10": {"env/reward_mean": 1.0, "loss/total": 3.0, "objective/kl": 2.5},
             "2": {"env/reward_mean": 0.5, "iter": 2}}
    rows = iteration_rows(stats)
    assert [row["iteration"] for row in rows] == [2, 10]  # numeric, not string, order
    assert rows[1] == {"iteration": 10, "reward_mean": 1.0, "kl": 2.5}  # only plotted keys, Vega-safe names
    assert rows[0] == {"iteration": 2, "reward_mean": 0.5}
    json.dumps(rows)  # JSON-ready


def test_offline_template_inlines_vega_and_keeps_dvc_placeholders() -> None:
    page = offline_html_template()
    assert page.count("{plot_divs}") == 1 and "{scripts}" not in page
    assert not re.search(r"<script[^>]*\bsrc=", page)
    assert "window.vegaEmbed" in page and page.count("</script>") == 1


def test_samples_table_shows_whole_responses_and_marks_empty_ones() -> None:
    """Rendered by Vega (vl-convert, no browser): no response is cut, an empty one is named."""
    import html

    import vl_convert

    long = "the woman playing all. then puts his somewhat very old great comedy all a horse and the whole cast"
    rows = [{"rev": "workspace", "query": "Masters of Horror has", "response_before": long, "score_before": -0.5,
             "response_after": "", "score_after": 0.9}]
    text = (ROOT / ".dvc/plots/samples_table.json").read_text()
    text = text.replace('"<DVC_METRIC_TITLE>"', '"samples"').replace('"<DVC_METRIC_DATA>"', json.dumps(rows))
    svg = html.unescape(vl_convert.vegalite_to_svg(json.loads(text)))
    assert long in svg and "…" not in svg
    assert "(empty response)" in svg and "+0.900" in svg and "-0.500" in svg.replace("−", "-")
