"""Evaluation reports: ``report.json``, a Markdown table, and PNG plots over training steps.

``report.json`` maps mode → difficulty level → ``{"accuracy", "mean_tokens", "think_rate",
"well_formed", "n"}`` (levels as strings, JSON keys, plus ``"all"``).  ``think_rate`` is the
fraction of responses that opened a non-empty think block (meaningful for auto mode; 1/0 by
construction for the forced modes when the model follows the template).

Beside the modes, the top-level key ``"oracle"`` holds the *oracle router*, the yardstick
for auto mode (absent when the report lacks ``think`` or ``no_think``):

* per level, the oracle routes every item of the level to the forced mode with the higher
  accuracy, and to no-think when the two are within :data:`ORACLE_TIE_POINTS` (no-think is
  cheaper).  The boundary is inclusive: exactly 2 points apart is a tie, so think is chosen
  only when ``think_acc - no_think_acc > 0.02`` (compared with a 1e-9 slack, so that
  0.92 - 0.90 counts as 2 points and not as 2.0000000000000018).  The level's entry is
  ``{"mode", "accuracy", "mean_tokens", "think_rate", "n"}``: accuracy, mean tokens and ``n``
  of the chosen forced mode; ``think_rate`` is 1.0 when routed to think, else 0.0.
* ``"all"``: n-weighted averages over levels of the per-level accuracy, mean tokens and think
  rate, ``n`` (their sum), ``auto_accuracy_gap`` (auto − oracle accuracy),
  ``auto_token_ratio`` (auto / oracle mean tokens; both ``null`` without auto mode) and
  ``tie_points``.

The oracle's entries carry ``accuracy`` and ``mean_tokens`` like a mode's, so code that walks
``report.items()`` as mode → level → metrics keeps working; the tables and plots here take
the modes from :data:`MODES` and show the oracle in its own section and plot.
"""

from __future__ import annotations

import json
import math
from importlib.util import find_spec
from pathlib import Path

from .log import get_logger

log = get_logger(__name__)

MODES = ("auto", "think", "no_think")
ORACLE = "oracle"
"""Top-level report key of the oracle router (not a mode)."""
ORACLE_TIE_POINTS = 0.02
"""Forced-mode accuracies this close (inclusive) are a tie, which the oracle gives to no-think."""
TARGET_ACCURACY_GAP = -0.02
"""Auto mode meets its accuracy target when ``auto_acc - oracle_acc`` is at least this."""
TARGET_TOKEN_RATIO = 1.10
"""Auto mode meets its token target when ``auto_tokens / oracle_tokens`` is at most this."""
_SLACK = 1e-9  # accuracies are k/n fractions: compare thresholds with float rounding forgiven

HAVE_MATPLOTLIB = find_spec("matplotlib") is not None


def _metrics(sel: list[dict]) -> dict:
    n = len(sel)
    return {"accuracy": sum(r["correct"] for r in sel) / n,
            "mean_tokens": sum(r["tokens"] for r in sel) / n,
            "think_rate": sum(r["thought"] for r in sel) / n,
            "well_formed": sum(r.get("well_formed", True) for r in sel) / n,
            "n": n}


def summarize(records: list[dict], *, key: str = "level") -> dict:
    """Aggregate per-response records ``{mode, level, correct, tokens, thought}`` into the
    report structure mode → level → metrics (plus an ``"all"`` level), with the oracle router
    under ``"oracle"`` when both forced modes were evaluated.  Records whose level is None
    (benchmark rows without one) count in ``"all"`` only.  ``key`` groups by another record
    field instead of ``level`` (a benchmark's name: the oracle then routes per benchmark)."""
    out: dict = {}
    for mode in MODES:
        rs = [r for r in records if r["mode"] == mode]
        if not rs:
            continue
        levels = sorted({r[key] for r in rs if r[key] is not None}, key=str)
        if all(isinstance(lv, int) for lv in levels):
            levels.sort()
        out[mode] = {}
        for lv in [*levels, "all"]:
            sel = rs if lv == "all" else [r for r in rs if r[key] == lv]
            out[mode][str(lv)] = _metrics(sel)
    return with_oracle(out)


def summarize_by(records: list[dict], key: str) -> dict:
    """mode → value of record field ``key`` (e.g. ``topic``) → metrics, without an ``"all"``
    entry or an oracle (per-topic rows of a benchmark)."""
    out: dict = {}
    for mode in MODES:
        rs = [r for r in records if r["mode"] == mode]
        if rs:
            out[mode] = {str(v): _metrics([r for r in rs if r[key] == v])
                         for v in sorted({r[key] for r in rs}, key=str)}
    return out


def oracle_router(report: dict, *, tie_points: float = ORACLE_TIE_POINTS) -> dict | None:
    """The oracle router of a report (see the module docstring for the rule and the schema).

    Levels evaluated in both forced modes count; ``None`` when ``think`` or ``no_think`` is
    missing or they share no level."""
    think, no_think = report.get("think"), report.get("no_think")
    if not think or not no_think:
        return None
    out: dict = {}
    # Without levels (benchmark rows carry none) the whole set is the one group routed.
    single = not any(lv != "all" for lv in think) and not any(lv != "all" for lv in no_think)
    for lv, t in think.items():
        nt = no_think.get(lv)
        if (lv == "all" and not single) or nt is None:
            continue
        mode = "think" if t["accuracy"] - nt["accuracy"] > tie_points + _SLACK else "no_think"
        m = t if mode == "think" else nt
        out[lv] = {"mode": mode, "accuracy": m["accuracy"], "mean_tokens": m["mean_tokens"],
                   "think_rate": 1.0 if mode == "think" else 0.0, "n": m["n"]}
    n = sum(m["n"] for m in out.values())
    if n == 0:
        return None

    def weighted(key: str) -> float:
        return sum(m[key] * m["n"] for m in out.values()) / n

    acc, tokens = weighted("accuracy"), weighted("mean_tokens")
    auto = report.get("auto", {}).get("all")
    chosen = out.pop("all", {}).get("mode")
    out["all"] = {
        **({"mode": chosen} if chosen else {}),
        "accuracy": acc,
        "mean_tokens": tokens,
        "think_rate": weighted("think_rate"),
        "n": n,
        "auto_accuracy_gap": auto["accuracy"] - acc if auto else None,
        "auto_token_ratio": auto["mean_tokens"] / tokens if auto and tokens > 0 else None,
        "tie_points": tie_points,
    }
    return out


def with_oracle(report: dict) -> dict:
    """``report`` with its ``"oracle"`` entry: unchanged when it has one or none can be
    computed, else a shallow copy with the oracle added (the mode entries are shared)."""
    if ORACLE in report:
        return report
    oracle = oracle_router(report)
    return report if oracle is None else {**report, ORACLE: oracle}


def _modes(report: dict) -> list[str]:
    """The report's mode keys, in report order (the oracle and any other key left out)."""
    return [k for k in report if k in MODES]


def _level_order(lv: str):
    """Sort key: numeric levels by value, then the rest ("all" last among them)."""
    return (0, int(lv), "") if lv.lstrip("-").isdigit() else (1, 0, lv)


def markdown_table(report: dict) -> str:
    """A Markdown table: one row per (mode, level); the oracle is not a mode and is left out
    (see :func:`oracle_markdown`)."""
    lines = ["| mode | level | accuracy | mean tokens | think rate | well-formed | n |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for mode in _modes(report):
        for lv, m in report[mode].items():
            lines.append(f"| {mode} | {lv} | {m['accuracy']:.3f} | {m['mean_tokens']:.1f} | "
                         f"{m['think_rate']:.3f} | {m.get('well_formed', 1.0):.3f} | {m['n']} |")
    return "\n".join(lines) + "\n"


def _cells(m: dict | None, *keys: str) -> str:
    fmt = {"accuracy": "{:.3f}", "mean_tokens": "{:.1f}", "think_rate": "{:.2f}"}
    return " | ".join("–" if m is None else fmt[k].format(m[k]) for k in keys)


def oracle_markdown(report: dict) -> str:
    """The oracle-router section of ``report.md``: a table per level (oracle choice, oracle,
    auto and forced-mode accuracy / tokens) and auto's gap and token ratio against the
    targets.  Empty when the report has no oracle."""
    oracle = report.get(ORACLE)
    if not oracle:
        return ""
    tie = oracle["all"]["tie_points"]
    lines = ["## Oracle router", "",
             "Per level the oracle routes to the forced mode with the higher accuracy, and to "
             f"no-think when the two are within {100 * tie:g} points (inclusive; no-think is "
             "cheaper). Overall values are n-weighted over levels.", "",
             "| level | oracle mode | oracle acc | oracle tokens | auto acc | auto tokens | "
             "auto think rate | think acc | think tokens | no-think acc | no-think tokens |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lv, o in oracle.items():
        if lv == "all":
            choice = f"think on {100 * o['think_rate']:.0f}% of items"
        else:
            choice = o["mode"]
        row = [lv, choice, _cells(o, "accuracy", "mean_tokens"),
               _cells(report.get("auto", {}).get(lv), "accuracy", "mean_tokens", "think_rate"),
               _cells(report["think"].get(lv), "accuracy", "mean_tokens"),
               _cells(report["no_think"].get(lv), "accuracy", "mean_tokens")]
        lines.append("| " + " | ".join(row) + " |")
    gap, ratio = oracle["all"]["auto_accuracy_gap"], oracle["all"]["auto_token_ratio"]
    lines.append("")
    if gap is None:
        lines.append("- auto mode not evaluated: no gap or token ratio.")
    else:
        met = "met" if gap >= TARGET_ACCURACY_GAP - _SLACK else "**not met**"
        lines.append(f"- auto accuracy gap (auto − oracle): {100 * gap:+.1f} points; target ≥ "
                     f"{100 * TARGET_ACCURACY_GAP:+.0f} points: {met}")
    if ratio is not None:
        met = "met" if ratio <= TARGET_TOKEN_RATIO + _SLACK else "**not met**"
        lines.append(f"- auto token ratio (auto / oracle mean tokens): {ratio:.2f}; target ≤ "
                     f"{TARGET_TOKEN_RATIO:.2f}: {met}")
    elif gap is not None:
        lines.append("- auto token ratio: undefined (the oracle's mean tokens are 0)")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | Path, *, history: list[dict] | None = None,
                 title: str = "r4b evaluation", source: dict | None = None) -> Path:
    """Write ``report.json``, ``report.md``, ``oracle.png`` (with both forced modes and
    matplotlib) and, with ``history``, the plots over steps to ``out_dir``.

    ``history`` is a list of ``{"step": int, "report": report}`` taken during training.  A
    report without an ``"oracle"`` entry gets one here when it can be computed.  ``source``
    (e.g. ``{"step": 8, "checkpoint": ".../step_00000008"}``: what was evaluated) goes to
    ``source.json`` and the top of ``report.md``.  The folder is written beside ``out_dir``
    and swapped in whole: a reader never sees a mix of two reports, and a kill while it is
    written leaves the previous report.
    """
    from .rundir import replace_dir

    report = with_oracle(report)
    final = Path(out_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    out = final.parent / f".{final.name}.tmp"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir()
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    md = f"# {title}\n\n"
    if source:
        (out / "source.json").write_text(json.dumps(source, indent=1) + "\n")
        md += "Evaluated: " + ", ".join(f"{k} `{v}`" for k, v in source.items()) + "\n\n"
    md += markdown_table(report)
    if ORACLE in report:
        md += "\n" + oracle_markdown(report)
        if HAVE_MATPLOTLIB:
            plot_oracle(report, out)
            md += "\n![oracle router: accuracy against mean tokens](oracle.png)\n"
        else:
            log.warning("oracle.png skipped: plots need matplotlib (pip install 'r4b[test]')")
    if history:
        md += "\n![think rate per level](think_rate.png)\n\n![accuracy per level](accuracy.png)\n"
        plot_history(history, out)
    (out / "report.md").write_text(md)
    replace_dir(out, final)
    log.info("report written to %s", final / "report.md")
    return final / "report.json"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'r4b[test]' or matplotlib") from e
    return plt


# One marker and colour per mode in the oracle plot; the oracle is drawn as a hollow ring
# around the forced mode it picked, so both stay visible.
_STYLE = {"no_think": dict(marker="v", color="tab:blue", label="forced no-think"),
          "think": dict(marker="^", color="tab:red", label="forced think"),
          "auto": dict(marker="o", color="tab:green", label="auto")}


def plot_oracle(report: dict, out_dir: str | Path) -> Path | None:
    """``oracle.png``: accuracy against mean tokens, one panel per level plus "all", with the
    forced modes, auto mode and the oracle router; the "all" panel shades auto's target region
    (accuracy ≥ oracle − 2 points, tokens ≤ 1.10 × oracle).  ``None`` without an oracle."""
    oracle = report.get(ORACLE) or oracle_router(report)
    if not oracle:
        return None
    plt = _pyplot()
    levels = sorted((lv for lv in oracle if lv != "all"), key=_level_order) + ["all"]
    ncols = min(len(levels), 5)
    nrows = math.ceil(len(levels) / ncols)
    height = 3.2 * nrows + 0.5  # inches; the bottom 0.5 hold the legend
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, height),
                             sharey=True, squeeze=False)
    for ax, lv in zip(axes.flat, levels):
        o = oracle[lv]
        pts = {mode: report[mode][lv] for mode in ("no_think", "think", "auto")
               if lv in report.get(mode, {})}
        if "think" in pts and "no_think" in pts:  # the forced modes' trade-off
            ax.plot([pts["no_think"]["mean_tokens"], pts["think"]["mean_tokens"]],
                    [pts["no_think"]["accuracy"], pts["think"]["accuracy"]],
                    color="0.75", linestyle="--", zorder=1)
        for mode, m in pts.items():
            ax.scatter(m["mean_tokens"], m["accuracy"], s=60, zorder=3, **_STYLE[mode])
        ax.scatter(o["mean_tokens"], o["accuracy"], s=220, facecolors="none",
                   edgecolors="black", linewidths=1.5, zorder=4, label="oracle router")
        xmax = max([o["mean_tokens"], *(m["mean_tokens"] for m in pts.values())])
        if lv == "all":
            ax.fill_between([0, TARGET_TOKEN_RATIO * o["mean_tokens"]],
                            o["accuracy"] + TARGET_ACCURACY_GAP, 1.05, color="tab:green",
                            alpha=0.12, zorder=0, label="auto target")
            xmax = max(xmax, TARGET_TOKEN_RATIO * o["mean_tokens"])
            ax.set_title(f"all levels (oracle thinks on {100 * o['think_rate']:.0f}%)",
                         fontsize=10)
        else:
            ax.set_title(f"level {lv} (oracle: {o['mode'].replace('_', '-')})", fontsize=10)
        ax.set(xlim=(0, 1.15 * xmax if xmax > 0 else 1), ylim=(-0.05, 1.05), xlabel="mean tokens")
        ax.grid(alpha=0.3)
    return _finish_panels(plt, fig, axes, len(levels), height,
                          "Oracle router vs auto mode: accuracy against mean tokens",
                          Path(out_dir) / "oracle.png")



def _finish_panels(plt, fig, axes, n_used: int, height: float, title: str, path: Path) -> Path:
    """Hide the unused panels, label the rows, put one legend under the grid, and write the
    figure to ``path`` (a temporary name renamed into place)."""
    for ax in axes.flat[n_used:]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("accuracy")
    handles, labels = axes.flat[n_used - 1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0), ncol=len(labels),
               frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.5 / height, 1, 1))
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path

def plot_history(history: list[dict], out_dir: str | Path) -> list[Path]:
    """PNG plots of auto-mode think rate and per-mode accuracy per level over training steps
    (keys of the history reports that are not modes, such as ``"oracle"``, are skipped)."""
    plt = _pyplot()
    out = Path(out_dir)
    steps = [h["step"] for h in history]
    levels = sorted({lv for h in history for mode in _modes(h["report"])
                     for lv in h["report"][mode] if lv != "all"}, key=_level_order)
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


# ---------------------------------------------------------------- benchmark evaluation
# ``r4b.evaluate``'s result: per benchmark a report as above (levels, oracle) plus per-topic
# rows, and overall a report keyed by benchmark (its oracle routes each benchmark to its better
# forced mode).  Layout:
#
#   {"model": {...}, "layout": {...}, "decoding": {...},
#    "benchmarks": {name: {"file", "n_items", "report", "topics"}},
#    "overall": {"n_items", "report", "benchmark_mean"}}
_MODE_LABEL = {"no_think": "no-think", "think": "think", "auto": "auto"}


def benchmark_mean(overall: dict) -> dict:
    """mode → unweighted mean over benchmarks of accuracy, mean tokens and think rate (the
    "average" column of a paper's table) from an overall report keyed by benchmark."""
    out = {}
    for mode in _modes(overall):
        rows = [m for b, m in overall[mode].items() if b != "all"]
        out[mode] = {k: sum(m[k] for m in rows) / len(rows)
                     for k in ("accuracy", "mean_tokens", "think_rate")}
    return out


def _bench_row(label: str, n, modes: list[str], get, with_oracle: bool,
               oracle: dict | None) -> str:
    cells = [label, str(n)]
    for mode in modes:
        m = get(mode)
        cells += ["–", "–"] if m is None else [f"{m['accuracy']:.3f}", f"{m['mean_tokens']:.1f}"]
        if mode == "auto":
            cells.append("–" if m is None else f"{m['think_rate']:.2f}")
    if with_oracle:
        cells += ["–", "–"] if oracle is None else [f"{oracle['accuracy']:.3f}",
                                                    f"{oracle['mean_tokens']:.1f}"]
    return "| " + " | ".join(cells) + " |"


def benchmark_markdown(result: dict) -> str:
    """The benchmark × mode table of ``report.md``: accuracy and mean response tokens per mode,
    auto mode's think rate and the oracle router, one row per benchmark, then the item-weighted
    total and the mean over benchmarks."""
    overall = result["overall"]["report"]
    modes = [m for m in ("no_think", "think", "auto") if m in overall]
    oracle = overall.get(ORACLE)
    head = ["benchmark", "n"]
    for mode in modes:
        head += [f"{_MODE_LABEL[mode]} acc", f"{_MODE_LABEL[mode]} tokens"]
        if mode == "auto":
            head.append("auto think rate")
    if oracle:
        head += ["oracle acc", "oracle tokens"]
    lines = ["| " + " | ".join(head) + " |",
             "|---|" + "---:|" * (len(head) - 1)]
    for name, b in result["benchmarks"].items():
        rep = b["report"]
        lines.append(_bench_row(name, b["n_items"], modes, lambda m: rep.get(m, {}).get("all"),
                                bool(oracle), (oracle or {}).get(name)))
    n = result["overall"]["n_items"]
    lines.append(_bench_row("**all (item-weighted)**", n, modes,
                            lambda m: overall.get(m, {}).get("all"), bool(oracle),
                            (oracle or {}).get("all")))
    if len(result["benchmarks"]) > 1:
        mean = result["overall"]["benchmark_mean"]
        omean = None
        if oracle:
            rows = [o for b, o in oracle.items() if b != "all"]
            omean = {k: sum(o[k] for o in rows) / len(rows) for k in ("accuracy", "mean_tokens")}
        lines.append(_bench_row("**mean over benchmarks**", "", modes, mean.get, bool(oracle),
                                omean))
    return "\n".join(lines) + "\n"


def topics_markdown(topics: dict) -> str:
    """Per-topic rows of one benchmark (mode, topic, accuracy, tokens, think rate, n)."""
    lines = ["| mode | topic | accuracy | mean tokens | think rate | n |",
             "|---|---|---:|---:|---:|---:|"]
    for mode, rows in topics.items():
        for topic, m in rows.items():
            lines.append(f"| {mode} | {topic} | {m['accuracy']:.3f} | {m['mean_tokens']:.1f} | "
                         f"{m['think_rate']:.3f} | {m['n']} |")
    return "\n".join(lines) + "\n"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_eval_report(result: dict, out_dir: str | Path, *, title: str = "r4b evaluation") -> Path:
    """Write ``report.json`` (``result`` as is), ``report.md`` (what was evaluated, the
    benchmark × mode table, then per benchmark its levels, topics and oracle router) and,
    with matplotlib, ``benchmarks.png`` (:func:`plot_benchmarks`) to ``out_dir``; each file
    is written to a temporary name and renamed into place."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_text_atomic(out / "report.json", json.dumps(result, indent=1) + "\n")
    md = [f"# {title}", ""]
    for section in ("model", "layout", "decoding"):
        if result.get(section):
            md.append(f"- {section}: " + ", ".join(f"{k} `{v}`" for k, v in result[section].items()))
    md += ["", "## Accuracy and mean response tokens per benchmark and mode", "",
           benchmark_markdown(result),
           f"The oracle router sends each benchmark to its forced mode with the higher accuracy "
           f"(no-think within {100 * ORACLE_TIE_POINTS:g} points); per level inside each "
           f"benchmark below. The mean over benchmarks weighs every benchmark equally.", ""]
    if HAVE_MATPLOTLIB:
        plot_benchmarks(result, out)
        md += ["![accuracy against mean response tokens per mode](benchmarks.png)", ""]
    else:
        log.warning("benchmarks.png skipped: plots need matplotlib (pip install 'r4b[test]')")
    for name, b in result["benchmarks"].items():
        md += [f"## {name}" + (f" (`{b['file']}`)" if b.get("file") else ""), "",
               markdown_table(b["report"])]
        if len(next(iter(b["topics"].values()), {})) > 1:
            md += ["Per topic:", "", topics_markdown(b["topics"])]
        if ORACLE in b["report"]:
            md.append(oracle_markdown(b["report"]).replace("## Oracle router", "### Oracle router"))
    _write_text_atomic(out / "report.md", "\n".join(md) + "\n")
    log.info("report written to %s", out / "report.md")
    return out / "report.json"


def plot_benchmarks(result: dict, out_dir: str | Path) -> Path:
    """``benchmarks.png``: accuracy against mean response tokens, one panel per benchmark plus
    all items, a marker per evaluated mode and a ring on the oracle router (when both forced
    modes were evaluated)."""
    plt = _pyplot()
    overall = result["overall"]["report"]
    oracle = overall.get(ORACLE) or {}
    panels = list(result["benchmarks"]) + ["all"]
    ncols = min(len(panels), 4)
    nrows = math.ceil(len(panels) / ncols)
    height = 3.2 * nrows + 0.5
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, height), sharey=True,
                             squeeze=False)
    for ax, name in zip(axes.flat, panels):
        pts = {mode: overall[mode][name] for mode in ("no_think", "think", "auto")
               if name in overall.get(mode, {})}
        if "think" in pts and "no_think" in pts:
            ax.plot([pts["no_think"]["mean_tokens"], pts["think"]["mean_tokens"]],
                    [pts["no_think"]["accuracy"], pts["think"]["accuracy"]],
                    color="0.75", linestyle="--", zorder=1)
        for mode, m in pts.items():
            ax.scatter(m["mean_tokens"], m["accuracy"], s=60, zorder=3, **_STYLE[mode])
        xs = [m["mean_tokens"] for m in pts.values()]
        if name in oracle:
            o = oracle[name]
            ax.scatter(o["mean_tokens"], o["accuracy"], s=220, facecolors="none",
                       edgecolors="black", linewidths=1.5, zorder=4, label="oracle router")
            xs.append(o["mean_tokens"])
        xmax = max(xs, default=0)
        n = result["overall"]["n_items"] if name == "all" else result["benchmarks"][name]["n_items"]
        ax.set_title(f"{'all items' if name == 'all' else name} (n={n})", fontsize=10)
        ax.set(xlim=(0, 1.15 * xmax if xmax > 0 else 1), ylim=(-0.05, 1.05),
               xlabel="mean response tokens")
        ax.grid(alpha=0.3)
    return _finish_panels(plt, fig, axes, len(panels), height,
                          "Accuracy against mean response tokens per mode",
                          Path(out_dir) / "benchmarks.png")
