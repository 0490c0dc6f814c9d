"""What `evaluate` writes for `dvc plots`, and the page `dvc plots show` renders into.

The plot data are JSON lists that ``dvc.yaml`` declares as plot outputs (uncached, so git
keeps them and DVC's run-cache still restores the stage): one row per PPO iteration with
the training statistics, and the held-out reward distribution before and after PPO. The
HTML template inlines Vega, Vega-Lite and Vega-Embed (bundled by ``vl-convert-python``)
so the plots render without network.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

ITERATION_SERIES = {
    "reward_mean": "env/reward_mean", "reward_std": "env/reward_std", "kl": "objective/kl",
    "kl_coef": "objective/kl_coef", "entropy": "policy/entropy", "clipfrac": "policy/clipfrac",
    "approxkl": "policy/approxkl", "policykl": "policy/policykl", "value_error": "val/error",
    "value_clipfrac": "val/clipfrac", "loss_policy": "loss/policy", "loss_value": "loss/value",
    "response_len_mean": "tokens/response_len_mean",
}
"""Plotted field -> key of an update@i metrics file (Vega-Lite field names cannot hold '/')."""


def iteration_rows(stats: Mapping[str, Mapping[str, float]]) -> list[dict[str, float]]:
    """One row per PPO iteration, in iteration order, with the plotted training statistics."""
    rows = []
    for key, metrics in stats.items():
        row: dict[str, float] = {"iteration": int(key)}
        row.update({field: float(metrics[name]) for field, name in ITERATION_SERIES.items() if name in metrics})
        rows.append(row)
    return sorted(rows, key=lambda row: row["iteration"])


def reward_histogram(before: np.ndarray, after: np.ndarray, bins: int = 24) -> list[dict]:
    """Share of prompts per reward bin, before and after PPO, on shared bin edges."""
    both = np.concatenate([before, after])
    lo, hi = float(both.min()), float(both.max())
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    rows = []
    shares = [np.histogram(x, bins=edges)[0] / max(len(x), 1) for x in (before, after)]
    for i in range(bins):
        rows.append({"reward": round(float((edges[i] + edges[i + 1]) / 2), 6),
                     "before": round(float(shares[0][i]), 6), "after": round(float(shares[1][i]), 6)})
    return rows


def offline_html_template() -> str:
    """A `dvc plots show` page template with the Vega libraries inlined (no CDN links).

    The template leaves out DVC's ``{scripts}`` placeholder, which is where DVC would
    put its ``<script src="https://cdn...">`` tags.
    """
    import vl_convert

    bundle = vl_convert.javascript_bundle()  # assigns vega, vegaLite, vegaEmbed on window
    bundle = bundle.replace("</script", "<\\/script")
    for placeholder in ("{plot_divs}", "{scripts}", "{refresh_tag}"):
        if placeholder in bundle:
            raise ValueError(f"vl-convert bundle contains the DVC placeholder {placeholder}")
    return "\n".join([
        "<!DOCTYPE html>",
        "<html>",
        "<head>",
        '<meta charset="utf-8">',
        "{refresh_tag}",
        "<title>minichatgpt plots</title>",
        "<script>", bundle, "</script>",
        "<style>body { font-family: sans-serif; } table { border-spacing: 15px; }</style>",
        "</head>",
        "<body>",
        "{plot_divs}",
        "</body>",
        "</html>",
        "",
    ])


def write_offline_html_template(path: str | Path) -> Path:
    """Write :func:`offline_html_template` to ``path`` (atomically) and return it."""
    from minichatgpt.pipeline.artifacts import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(offline_html_template(), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m minichatgpt.pipeline.report",
        description="Write the offline HTML template that .dvc/config points `dvc plots show` at.",
    )
    p.add_argument("path", nargs="?", default=".dvc/plots/offline.html")
    path = write_offline_html_template(p.parse_args(argv).path)
    print(json.dumps({"template": str(path), "bytes": path.stat().st_size}))


if __name__ == "__main__":
    main()
