"""What `evaluate` reports through dvclive, and the page `dvc plots show` renders into.

The dvclive directory is a DVC stage output whose files the plots in ``dvc.yaml``
point at: one row per PPO iteration for each training series, the held-out reward
distribution before and after PPO. The HTML template inlines Vega, Vega-Lite and
Vega-Embed (bundled by ``vl-convert-python``) so the plots render without network.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

ITERATION_SERIES = (
    "env/reward_mean", "env/reward_std", "objective/kl", "objective/kl_coef", "policy/entropy",
    "policy/clipfrac", "policy/approxkl", "policy/policykl", "val/error", "val/clipfrac",
    "loss/policy", "loss/value", "tokens/response_len_mean",
)
"""Per-iteration training statistics logged as dvclive series (plus every ``time/`` key)."""


def iteration_series(stats: Mapping[str, Mapping[str, float]]) -> dict[int, dict[str, float]]:
    """Pick the logged series out of each iteration's update metrics, keyed by iteration."""
    series = {}
    for key, metrics in stats.items():
        picked = {k: float(v) for k, v in metrics.items() if k in ITERATION_SERIES or k.startswith("time/")}
        series[int(key)] = picked
    return dict(sorted(series.items()))


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


def write_live(
    out_dir: str | Path, series: Mapping[int, Mapping[str, float]], summary: Mapping[str, float],
    histogram: Sequence[Mapping[str, float]],
) -> None:
    """Log per-iteration series, the final summary and the reward distribution with dvclive.

    ``dvcyaml=None``: the plots are declared in the project's ``dvc.yaml``, which dvclive
    must not rewrite; ``save_dvc_exp=False``: the stage runs inside ``dvc repro``/``exp run``.
    """
    from dvclive import Live

    with Live(dir=str(out_dir), dvcyaml=None, save_dvc_exp=False, report=None) as live:
        for iteration, values in series.items():
            live.step = iteration
            for key, value in values.items():
                live.log_metric(key, value)
        for key in ("reward_before", "reward_after", "reward_stderr", "kl", "kl_stderr"):
            live.log_metric(f"eval/{key}", float(summary[key]), plot=False)
        live.log_plot("reward_distribution", list(histogram), x="reward", y=["before", "after"],
                      template="linear", title="Held-out reward before and after PPO",
                      x_label="reward", y_label="share of prompts")


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
    from minichatgpt.artifacts import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(offline_html_template(), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m minichatgpt.report",
        description="Write the offline HTML template that .dvc/config points `dvc plots show` at.",
    )
    p.add_argument("path", nargs="?", default=".dvc/plots/offline.html")
    path = write_offline_html_template(p.parse_args(argv).path)
    print(json.dumps({"template": str(path), "bytes": path.stat().st_size}))


if __name__ == "__main__":
    main()
