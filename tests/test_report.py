"""Evaluation reports: the oracle router, the unchanged mode entries, and the written files."""

import json
import random
import struct

import pytest

import r4b.evaluate as evaluate_mod
import r4b.report as report_mod
from r4b.report import (MODES, ORACLE_TIE_POINTS, markdown_table, oracle_markdown,
                        oracle_router, plot_history, plot_oracle, summarize, with_oracle,
                        write_report)


def _records(spec: dict, seed: int = 0) -> list[dict]:
    """Records from ``{mode: {level: (n, n_correct, tokens_per_response)}}``, shuffled.

    Auto mode thinks on a level when its tokens exceed 10 (enough for a think rate)."""
    out = []
    for mode, levels in spec.items():
        for lv, (n, k, tok) in levels.items():
            for i in range(n):
                out.append({"mode": mode, "level": lv, "correct": float(i < k), "tokens": tok,
                            "thought": float(mode == "think" or (mode == "auto" and tok > 10)),
                            "well_formed": i != n - 1 or mode != "auto"})
    random.Random(seed).shuffle(out)
    return out


def _old_summarize(records: list[dict]) -> dict:
    """The report as built before the oracle existed: mode → level → metrics, nothing else."""
    out = {}
    for mode in ("auto", "think", "no_think"):
        rs = [r for r in records if r["mode"] == mode]
        if not rs:
            continue
        out[mode] = {}
        for lv in [*sorted({r["level"] for r in rs}), "all"]:
            sel = rs if lv == "all" else [r for r in rs if r["level"] == lv]
            out[mode][str(lv)] = {
                "accuracy": sum(r["correct"] for r in sel) / len(sel),
                "mean_tokens": sum(r["tokens"] for r in sel) / len(sel),
                "think_rate": sum(r["thought"] for r in sel) / len(sel),
                "well_formed": sum(r["well_formed"] for r in sel) / len(sel),
                "n": len(sel),
            }
    return out


# Level 1: think clearly better.  Level 2: equal accuracy (a tie).  Level 3: no-think better.
# Level n differ (10 / 30 / 50) so the overall values must be n-weighted.
SPEC = {
    "auto": {1: (10, 8, 30), 2: (30, 27, 6), 3: (50, 35, 4)},
    "think": {1: (10, 9, 40), 2: (30, 27, 44), 3: (50, 25, 50)},
    "no_think": {1: (10, 5, 8), 2: (30, 27, 6), 3: (50, 35, 4)},
}


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_oracle_picks_think_when_clearly_better():
    rep = summarize(_records({"think": {1: (50, 45, 30)}, "no_think": {1: (50, 25, 5)}}))
    o = rep["oracle"]["1"]
    assert o == {"mode": "think", "accuracy": 0.9, "mean_tokens": 30.0, "think_rate": 1.0, "n": 50}


def test_oracle_picks_no_think_within_two_points():
    # think 0.91 vs no-think 0.90: think is better, but by 1 point only.
    rep = summarize(_records({"think": {1: (100, 91, 30)}, "no_think": {1: (100, 90, 5)}}))
    o = rep["oracle"]["1"]
    assert o == {"mode": "no_think", "accuracy": 0.9, "mean_tokens": 5.0, "think_rate": 0.0,
                 "n": 100}


def test_oracle_picks_no_think_when_better():
    # The forced modes may hold different counts (n 40 vs 50): the chosen mode's n counts.
    rep = summarize(_records({"think": {1: (40, 16, 30)}, "no_think": {1: (50, 40, 5)}}))
    assert rep["oracle"]["1"] == {"mode": "no_think", "accuracy": 0.8, "mean_tokens": 5.0,
                                  "think_rate": 0.0, "n": 50}
    assert rep["oracle"]["all"]["n"] == 50


def test_oracle_boundary_exactly_two_points_is_a_tie():
    """Convention: exactly 2 points apart is a tie (no-think).  0.92 - 0.90 is
    0.020000000000000018 in floats, so a plain ``>`` would wrongly pick think."""
    assert 46 / 50 - 45 / 50 > ORACLE_TIE_POINTS  # the float trap this test guards against
    rep = summarize(_records({"think": {1: (50, 46, 30)}, "no_think": {1: (50, 45, 5)}}))
    assert rep["oracle"]["1"]["mode"] == "no_think"
    # Just over 2 points (0.925 vs 0.900): think.
    rep = summarize(_records({"think": {1: (40, 37, 30)}, "no_think": {1: (40, 36, 5)}}))
    assert rep["oracle"]["1"]["mode"] == "think"
    # The tie width is a parameter: with 3 points, 2.5 points apart is a tie.
    assert oracle_router(rep, tie_points=0.03)["1"]["mode"] == "no_think"


def test_oracle_overall_is_n_weighted_with_gap_and_ratio():
    rep = summarize(_records(SPEC))
    o = rep["oracle"]
    assert [o[lv]["mode"] for lv in ("1", "2", "3")] == ["think", "no_think", "no_think"]
    # By hand: level 1 think (0.9, 40 tok, n 10), level 2 no-think (0.9, 6 tok, n 30),
    # level 3 no-think (0.7, 4 tok, n 50).
    acc = (10 * 0.9 + 30 * 0.9 + 50 * 0.7) / 90  # 71 / 90
    tokens = (10 * 40 + 30 * 6 + 50 * 4) / 90  # 780 / 90
    auto_acc = (8 + 27 + 35) / 90
    auto_tokens = (10 * 30 + 30 * 6 + 50 * 4) / 90  # 680 / 90
    a = o["all"]
    assert a["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert a["mean_tokens"] == pytest.approx(tokens, abs=1e-12)
    assert a["think_rate"] == pytest.approx(10 / 90, abs=1e-12)
    assert a["n"] == 90
    assert a["auto_accuracy_gap"] == pytest.approx(auto_acc - acc, abs=1e-12)
    assert a["auto_token_ratio"] == pytest.approx(auto_tokens / tokens, abs=1e-12)
    assert a["tie_points"] == 0.02
    # Not the unweighted mean over levels (0.789 vs 0.833).
    assert a["accuracy"] != pytest.approx((0.9 + 0.9 + 0.7) / 3, abs=0.01)
    assert set(a) == {"accuracy", "mean_tokens", "think_rate", "n", "auto_accuracy_gap",
                      "auto_token_ratio", "tie_points"}


@pytest.mark.parametrize("modes", [("auto", "think"), ("auto", "no_think"), ("think",), ("auto",)])
def test_no_oracle_without_both_forced_modes(modes, tmp_path):
    rep = summarize(_records({m: SPEC[m] for m in modes}))
    assert "oracle" not in rep
    assert oracle_router(rep) is None
    assert plot_oracle(rep, tmp_path) is None
    assert oracle_markdown(rep) == ""
    write_report(rep, tmp_path, history=[{"step": 0, "report": rep}])
    assert json.loads((tmp_path / "report.json").read_text()) == rep
    assert not (tmp_path / "oracle.png").exists()
    assert "Oracle" not in (tmp_path / "report.md").read_text()
    assert (tmp_path / "accuracy.png").stat().st_size > 0


def test_oracle_without_auto_has_no_gap():
    rep = summarize(_records({m: SPEC[m] for m in ("think", "no_think")}))
    a = rep["oracle"]["all"]
    assert a["auto_accuracy_gap"] is None and a["auto_token_ratio"] is None
    assert "auto mode not evaluated" in oracle_markdown(rep)


def test_existing_report_keys_unchanged(tmp_path):
    records = _records(SPEC, seed=3)
    old = _old_summarize(records)
    rep = summarize(records)
    assert list(rep) == [*old, "oracle"]
    for mode in old:
        assert list(rep[mode]) == list(old[mode])
        assert rep[mode] == old[mode]
    write_report(rep, tmp_path)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert {k: v for k, v in on_disk.items() if k != "oracle"} == old
    assert on_disk["oracle"] == rep["oracle"]
    assert on_disk["auto"]["all"] == old["auto"]["all"]


def test_write_report_adds_oracle_to_an_old_report(tmp_path):
    old = _old_summarize(_records(SPEC))
    write_report(old, tmp_path)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["oracle"] == oracle_router(old)
    assert "oracle" not in old  # the caller's report is not mutated
    assert with_oracle(on_disk) is on_disk  # an existing oracle entry is kept as is


def test_markdown_table_skips_the_oracle():
    rep = summarize(_records(SPEC))
    table = markdown_table(rep)
    assert table == markdown_table({k: v for k, v in rep.items() if k != "oracle"})
    assert "oracle" not in table
    assert len(table.strip().splitlines()) == 2 + 3 * 4  # header + 3 modes x (3 levels + all)


def test_oracle_markdown_table_and_targets():
    rep = summarize(_records(SPEC))
    md = oracle_markdown(rep)
    rows = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(rows) == 1 + 4  # header + 3 levels + all
    assert rows[1].split(" | ")[:3] == ["| 1", "think", "0.900"]
    assert rows[2].split(" | ")[:2] == ["| 2", "no_think"]
    # auto: 70/90 vs oracle 71/90: gap -1.1 points, met; tokens 680/780 = 0.87, met.
    assert "-1.1 points; target ≥ -2 points: met" in md
    assert "0.87; target ≤ 1.10: met" in md
    # Auto two items worse and thinking everywhere: gap -3.3 points, ratio 44 / (780 / 90)
    # = 5.08: both missed.
    spec = {**SPEC, "auto": {1: (10, 8, 44), 2: (30, 26, 44), 3: (50, 34, 44)}}
    md = oracle_markdown(summarize(_records(spec)))
    assert "-3.3 points; target ≥ -2 points: **not met**" in md
    assert "5.08; target ≤ 1.10: **not met**" in md


def test_accuracy_target_boundary_is_inclusive():
    # Auto exactly 2 points under the oracle (0.88 vs 0.90) meets the target.
    spec = {"auto": {1: (50, 44, 5)}, "think": {1: (50, 45, 30)}, "no_think": {1: (50, 20, 5)}}
    md = oracle_markdown(summarize(_records(spec)))
    assert "-2.0 points; target ≥ -2 points: met" in md


def test_write_report_with_history_writes_all_files(tmp_path):
    rep = summarize(_records(SPEC))
    early = summarize(_records({**SPEC, "auto": {1: (10, 2, 5), 2: (30, 20, 5), 3: (20, 9, 5)}}))
    history = [{"step": 0, "report": early}, {"step": 4, "report": rep}]
    assert all("oracle" in h["report"] for h in history)
    path = write_report(rep, tmp_path, history=history, title="t")
    assert path == tmp_path / "report.json"
    for name in ("report.json", "report.md", "oracle.png", "think_rate.png", "accuracy.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# t\n\n" + markdown_table(rep))
    assert "## Oracle router" in md and "](oracle.png)" in md and "](accuracy.png)" in md
    # One accuracy panel per mode (4 in x 100 dpi each): the oracle is not a mode.
    assert _png_size(tmp_path / "accuracy.png")[0] == 3 * 400
    # Oracle plot: 3 levels + "all", one row of 3.2 in panels.
    assert _png_size(tmp_path / "oracle.png")[0] == 4 * 320


def test_write_report_without_history_writes_oracle_plot(tmp_path):
    rep = summarize(_records(SPEC))
    write_report(rep, tmp_path)
    assert (tmp_path / "oracle.png").stat().st_size > 0
    assert not (tmp_path / "accuracy.png").exists()
    assert "](oracle.png)" in (tmp_path / "report.md").read_text()


def test_write_report_without_matplotlib_skips_oracle_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(report_mod, "HAVE_MATPLOTLIB", False)
    rep = summarize(_records(SPEC))
    write_report(rep, tmp_path)
    assert not (tmp_path / "oracle.png").exists()
    md = (tmp_path / "report.md").read_text()
    assert "## Oracle router" in md and "oracle.png" not in md


@pytest.fixture
def legends(monkeypatch):
    """Legend labels of every figure the report module closes, per axes, in order."""
    out = []
    real = report_mod._pyplot

    def pyplot():
        plt = real()
        close = plt.close

        def spy(fig):
            out.append([ax.get_legend_handles_labels()[1] for ax in fig.axes])
            close(fig)

        monkeypatch.setattr(plt, "close", spy)
        return plt

    monkeypatch.setattr(report_mod, "_pyplot", pyplot)
    return out


def test_plot_history_skips_non_mode_keys(tmp_path, legends):
    rep = summarize(_records(SPEC))
    # A non-mode key with a level no mode has: walking it would add a "level 9" line.
    rep["oracle"] = {**rep["oracle"], "9": {"accuracy": 0.5, "mean_tokens": 1.0, "n": 1}}
    paths = plot_history([{"step": 0, "report": rep}, {"step": 1, "report": rep}], tmp_path)
    assert [p.name for p in paths] == ["think_rate.png", "accuracy.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    think_rate, accuracy = legends
    assert think_rate == [["level 1", "level 2", "level 3"]]
    assert len(accuracy) == 3  # one panel per mode: the oracle is not a mode
    assert _png_size(tmp_path / "accuracy.png")[0] == 3 * 400


def test_plot_history_orders_levels_numerically(tmp_path, legends):
    spec = {m: dict(zip((2, 10), list(SPEC[m].values())[:2])) for m in MODES}
    plot_history([{"step": 0, "report": summarize(_records(spec))}], tmp_path)
    assert legends[0] == [["level 2", "level 10"]]


def test_oracle_plot_has_every_mode_and_level(tmp_path, legends):
    rep = summarize(_records(SPEC))
    assert plot_oracle(rep, tmp_path) == tmp_path / "oracle.png"
    (panels,) = legends
    assert len(panels) == 4  # levels 1-3 and all
    assert panels[-1] == ["forced no-think", "forced think", "auto", "oracle router",
                          "auto target"]
    assert all(p[:4] == panels[-1][:4] for p in panels)


def test_log_report_prints_the_oracle(monkeypatch):
    rep = summarize(_records(SPEC))
    seen = []
    monkeypatch.setattr(evaluate_mod.log, "info",
                        lambda msg, *a: seen.append(msg % a if a else msg))
    evaluate_mod.log_report(rep, "after test")
    lines = seen[0].splitlines()
    assert lines[0] == "after test"
    oracle_line = next(ln for ln in lines if ln.strip().startswith("oracle"))
    assert oracle_line.split() == ["oracle", "L1:", "acc", "0.90", "tok", "40",
                                   "L2:", "acc", "0.90", "tok", "6",
                                   "L3:", "acc", "0.70", "tok", "4"]
    assert len(lines) == 1 + 4  # three modes and the oracle
