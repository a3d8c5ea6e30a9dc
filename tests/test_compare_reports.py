"""compare's reports: held-out lr under tune_test, suite reports (Markdown + JSON), loss format, plots, docs."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import torch
from tiny_tasks import make_tiny

from learned_optim import CoordinateLSTM
from learned_optim.compare import Comparison, OptimizerSummary, compare, format_loss
from learned_optim.report import markdown, plot_curves, write_suite_report
from learned_optim.suites import SuiteResult, run_suite

ROOT = Path(__file__).resolve().parent.parent


def table_rows(table: str) -> list[list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def _reject_constant(name: str) -> None:
    raise AssertionError(f"JSON holds the non-standard token {name}")


def _summary(name: str, loss: float, per_seed: list[float] | None = None) -> OptimizerSummary:
    xs = per_seed or [loss]
    return OptimizerSummary(
        name, {"mean_loss": 1.0, "final_loss": 1.0}, loss, loss, loss, [[loss] * 3], 0.1,
        per_seed={"mean_loss": xs, "final_loss": xs, "test_loss": xs},
    )  # fmt: skip


# ---------------------------------------------------------------------------- held-out lr under tune_test
def test_tune_test_table_and_report_say_which_lr_the_held_out_loss_used():
    # With tune_test the held-out column came from another lr than "lr (b)", and nothing said so.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        rule = CoordinateLSTM(hidden_size=8)
    result = compare(make_tiny(), rules=[rule], steps=5, seeds=2, baselines=["sgd", "adam"], grid=(0.01, 0.1, 1.0),
                     progress=False, tune_test=True)  # fmt: skip
    head, _, *rows = table_rows(result.table())
    assert head[:4] == ["optimizer", "lr (a)", "lr (b)", "lr (held-out)"] and len(head) == 11
    assert rows[0][3] == "1"  # a learned rule: its own lr
    for row, summary in zip(rows[1:], result.results[1:], strict=True):
        assert row[3] == f"{summary.best_lr['test_loss']:g}"
        assert row[8] == format_loss(summary.grid[row[3]]["test_loss"])  # the held-out loss is the one at that lr
    text = markdown(result)
    assert "at their lr best on held-out loss itself (column lr (held-out))" in text
    assert "held-out loss at the lr best on (b)" not in text
    assert result.to_json()["tune_test"] is True

    plain = compare(make_tiny(), rules=[], steps=3, seeds=1, baselines=["sgd"], grid=(0.1,), progress=False)
    assert "lr (held-out)" not in plain.table() and "held-out loss at the lr best on (b)." in markdown(plain)
    assert plain.to_json()["tune_test"] is False


def test_seed_xor_suite_writes_markdown_and_json_naming_the_held_out_lr(tmp_path, monkeypatch):
    import learned_optim.suites

    classical = {"RBF SVM": (0.25, 0.05)}
    monkeypatch.setattr(learned_optim.suites, "classical_baselines", lambda n: classical)
    result = run_suite("seed-xor", rules=[], seeds=2, progress=False, baselines="sgd")
    (comparison,) = result.comparisons
    assert comparison.tune_test and comparison.baselines == ["sgd"]
    sgd = comparison.results[0]

    paths = write_suite_report(result, tmp_path, command="learned-optim compare --suite seed-xor")
    names = [p.name for p in paths]
    # The names the CLI has always written, plus the JSON beside the Markdown.
    assert names[:2] == ["suite-seed-xor.md", "suite-seed-xor.json"]
    assert names[2:] == ["suite-seed-xor-seed-xor-noise0.05-200.png"]

    md = paths[0].read_text()
    assert md.startswith("```\nlearned-optim compare --suite seed-xor\n```\n\n# Suite `seed-xor`")
    assert "## seed-xor-noise0.05, 200 steps, 2 seeds" in md
    assert "taken at their learning rate best on held-out loss (column `lr (held-out)`), not at `lr (b)`" in md
    head, _, row = table_rows(md)
    assert head[3] == "lr (held-out)" and row[3] == f"{sgd.best_lr['test_loss']:g}"
    assert f"(lr {sgd.best_lr['test_loss']:g})" in md  # the mean ± std line names it too

    data = json.loads(paths[1].read_text(), parse_constant=_reject_constant)
    assert data["suite"] == "seed-xor" and data["command"] == "learned-optim compare --suite seed-xor"
    assert data["classical"] == {"RBF SVM": {"mean": 0.25, "std": 0.05}}
    (cmp_json,) = data["comparisons"]
    assert cmp_json["tune_test"] is True and cmp_json["task"] == "seed-xor-noise0.05" and cmp_json["steps"] == 200
    assert cmp_json["results"][0]["best_lr"]["test_loss"] == sgd.best_lr["test_loss"]


def test_suite_without_tune_test_has_no_held_out_lr_column_or_caption(tmp_path):
    comparison = Comparison(task="t", steps=1, seeds=[0], results=[_summary("rule", 0.5)], baselines=[])
    result = SuiteResult("paper", [comparison, comparison])
    md = result.markdown()
    assert "lr (held-out)" not in md and "best on held-out loss" not in md
    assert md.count("## t, 1 step, 1 seed\n") == 2  # not "1 steps, 1 seeds"
    paths = write_suite_report(result, tmp_path)
    assert [p.name for p in paths][:2] == ["suite-paper.md", "suite-paper.json"]
    assert paths[0].read_text() == md  # no command given: no command block
    data = json.loads(paths[1].read_text(), parse_constant=_reject_constant)
    assert data["classical"] is None and data["command"] is None and len(data["comparisons"]) == 2


# ---------------------------------------------------------------------------- loss format
@pytest.mark.parametrize(
    ("value", "decimals", "text"),
    [
        (0.2376, 4, "0.2376"),
        (12.5, 4, "12.5000"),
        (0.0285, 4, "0.0285"),
        (0.002213, 4, "0.002213"),
        (1.23e-05, 4, "1.23e-05"),
        (1.23456e-05, 4, "1.235e-05"),
        (-1.5e-06, 4, "-1.5e-06"),
        (0.0, 4, "0.0000"),
        (float("inf"), 4, "inf"),
        (float("nan"), 4, "nan"),
        (0.4861, 3, "0.486"),
        (0.015, 3, "0.015"),
        (4.2e-07, 3, "4.2e-07"),
    ],
)
def test_format_loss_keeps_significant_digits_of_small_values(value, decimals, text):
    assert format_loss(value, decimals) == text


def test_small_losses_are_not_shown_as_zero_in_tables():
    # "0.0000 | 35.00": a ratio beside a loss printed as zero.
    rule, sgd = _summary("rule", 3.5e-05, [3e-05, 4e-05]), _summary("sgd", 1e-06, [1e-06, 1e-06])
    comparison = Comparison(task="t", steps=3, seeds=[0, 1], results=[rule, sgd], baselines=["sgd"])
    _, _, rule_row, sgd_row = table_rows(comparison.table())
    assert rule_row[3:8] == ["3.5e-05", "35.00", "3.5e-05", "35.00", "3.5e-05"]
    assert sgd_row[3] == "1e-06"
    suite = SuiteResult("seed-xor", [comparison], classical={"linear SVM": (2e-05, 1e-06)})
    md = suite.markdown()
    assert "| rule | 1 | 1 | 3.5e-05 | 35.00 |" in md
    assert "- rule: 3.5e-05 ± 5e-06\n" in md and "- sgd: 1e-06 ± 0.000 (lr 1)" in md
    assert "- linear SVM: 2e-05 ± 1e-06" in md


def test_small_ratios_keep_two_significant_digits():
    # A rule 200x better than the best baseline printed its ratio as "0.00".
    rule, sgd = _summary("rule", 4.7e-06, [4.7e-06, 4.7e-06]), _summary("sgd", 1e-03, [1e-03, 1e-03])
    comparison = Comparison(task="t", steps=3, seeds=[0, 1], results=[rule, sgd], baselines=["sgd"])
    _, _, rule_row, sgd_row = table_rows(comparison.table())
    assert rule_row[4] == "0.0047" and rule_row[6] == "0.0047"
    assert sgd_row[4] == "1.00"


# ---------------------------------------------------------------------------- plots and headings
@pytest.mark.parametrize("steps", [3, 10])
def test_plot_has_whole_step_ticks_and_a_plural_only_for_several_seeds(monkeypatch, tmp_path, steps):
    from matplotlib.figure import Figure

    figures = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), savefig(fig, *a, **k)))
    curve = [1.0 / (t + 1) for t in range(steps)]
    summary = OptimizerSummary("rule", {"final_loss": 1.0}, 0.5, 0.1, 0.1, [curve], 0.1)
    for seeds, title in (([0], "t, 1 seed (mean, min-max)"), ([0, 1], "t, 2 seeds (mean, min-max)")):
        result = Comparison(task="t", steps=steps, seeds=seeds, results=[summary], baselines=[])
        assert plot_curves(result, tmp_path / "curves.png") is not None
        ax = figures[-1].axes[0]
        assert ax.get_title() == title
        ticks = list(ax.get_xticks())
        assert ticks and all(t == int(t) for t in ticks), ticks


def test_markdown_report_counts_steps_and_seeds_in_words():
    result = Comparison(task="t", steps=1, seeds=[0], results=[_summary("rule", 0.5)], baselines=[])
    assert "\n1 step, 1 evaluation seed (each fixes" in markdown(result)
    result = Comparison(task="t", steps=2, seeds=[0, 1], results=[_summary("rule", 0.5)], baselines=[])
    assert "\n2 steps, 2 evaluation seeds (each fixes" in markdown(result)


# ---------------------------------------------------------------------------- docs
def test_docs_list_every_argument_of_compare():
    # rule_lrs was missing from both the signature block and the argument table.
    text = (ROOT / "docs" / "compare.md").read_text()
    api = text[text.index("## Python API") :]
    signature = re.search(r"compare\(task,.*?\) -> Comparison", api, flags=re.S).group(0)
    table = set(re.findall(r"^\| `(\w+)` \|", api, flags=re.M))
    for name in inspect.signature(compare).parameters:
        assert re.search(rf"\b{name}\b", signature), f"{name} missing from the signature in docs/compare.md"
        assert name in table, f"{name} missing from the argument table in docs/compare.md"


def test_an_interrupted_report_leaves_the_previous_one_whole(monkeypatch, tmp_path):
    # The .md and .json were rewritten in place before the plot was drawn: a Ctrl-C there left a
    # report of the new run beside the plot of the old one, and a kill mid-write a truncated file.
    import learned_optim.report as report

    one = Comparison(task="t", steps=3, seeds=[0], results=[_summary("rule", 0.5)], baselines=[])
    paths = report.write_report(one, tmp_path, command="first")
    assert sorted(p.name for p in paths) == ["t-3.json", "t-3.md", "t-3.png"]
    before = {p.name: p.read_bytes() for p in paths}
    two = Comparison(task="t", steps=3, seeds=[0, 1], results=one.results, baselines=[])

    def interrupted(result):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "curves_png", interrupted)
    with pytest.raises(KeyboardInterrupt):
        report.write_report(two, tmp_path, command="second")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporaries left either
