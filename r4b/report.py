"""Evaluation reports: ``report.json``, a Markdown table, and PNG plots over training steps.

``report.json`` maps mode → difficulty level → ``{"accuracy", "mean_tokens", "think_rate",
"n"}`` (levels as strings, JSON keys).  ``think_rate`` is the fraction of responses that
opened a non-empty think block (meaningful for auto mode; 1/0 by construction for the forced
modes when the model follows the template).
"""

from __future__ import annotations

import json
from pathlib import Path

from .log import get_logger

log = get_logger(__name__)

MODES = ("auto", "think", "no_think")


def summarize(records: list[dict]) -> dict:
    """Aggregate per-response records ``{mode, level, correct, tokens, thought}`` into the
    report structure mode → level → metrics (plus an ``"all"`` level)."""
    out: dict = {}
    for mode in MODES:
        rs = [r for r in records if r["mode"] == mode]
        if not rs:
            continue
        levels = sorted({r["level"] for r in rs})
        out[mode] = {}
        for lv in [*levels, "all"]:
            sel = rs if lv == "all" else [r for r in rs if r["level"] == lv]
            n = len(sel)
            out[mode][str(lv)] = {
                "accuracy": sum(r["correct"] for r in sel) / n,
                "mean_tokens": sum(r["tokens"] for r in sel) / n,
                "think_rate": sum(r["thought"] for r in sel) / n,
                "well_formed": sum(r.get("well_formed", True) for r in sel) / n,
                "n": n,
            }
    return out


def markdown_table(report: dict) -> str:
    """A Markdown table: one row per (mode, level)."""
    lines = ["| mode | level | accuracy | mean tokens | think rate | well-formed | n |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for mode, levels in report.items():
        for lv, m in levels.items():
            lines.append(f"| {mode} | {lv} | {m['accuracy']:.3f} | {m['mean_tokens']:.1f} | "
                         f"{m['think_rate']:.3f} | {m.get('well_formed', 1.0):.3f} | {m['n']} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | Path, *, history: list[dict] | None = None,
                 title: str = "r4b evaluation") -> Path:
    """Write ``report.json``, ``report.md`` and (with ``history``) PNG plots to ``out_dir``.

    ``history`` is a list of ``{"step": int, "report": report}`` taken during training.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    md = f"# {title}\n\n" + markdown_table(report)
    if history:
        md += "\n![think rate per level](think_rate.png)\n\n![accuracy per level](accuracy.png)\n"
        plot_history(history, out)
    (out / "report.md").write_text(md)
    log.info("report written to %s", out / "report.md")
    return out / "report.json"


def plot_history(history: list[dict], out_dir: str | Path) -> list[Path]:
    """PNG plots of auto-mode think rate and per-mode accuracy per level over training steps."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'r4b[test]' or matplotlib") from e
    out = Path(out_dir)
    steps = [h["step"] for h in history]
    levels = sorted({lv for h in history for m in h["report"].values() for lv in m if lv != "all"})
    paths = []
    # Think rate of auto mode, one line per level.
    fig, ax = plt.subplots(figsize=(6, 4))
    for lv in levels:
        ys = [h["report"].get("auto", {}).get(lv, {}).get("think_rate", float("nan")) for h in history]
        ax.plot(steps, ys, marker="o", label=f"level {lv}")
    ax.set(xlabel="BPO step", ylabel="think rate (auto mode)", ylim=(-0.05, 1.05),
           title="Auto mode: think rate per difficulty level")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "think_rate.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    # Accuracy per level, one panel per mode.
    modes = [m for m in MODES if any(m in h["report"] for h in history)]
    fig, axes = plt.subplots(1, len(modes), figsize=(4 * len(modes), 3.6), sharey=True, squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for lv in levels:
            ys = [h["report"].get(mode, {}).get(lv, {}).get("accuracy", float("nan")) for h in history]
            ax.plot(steps, ys, marker="o", label=f"level {lv}")
        ax.set(xlabel="BPO step", title=f"{mode} accuracy", ylim=(-0.05, 1.05))
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend()
    fig.tight_layout()
    paths.append(out / "accuracy.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths
