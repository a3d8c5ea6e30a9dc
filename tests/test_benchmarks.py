"""The benchmark scripts run end to end at tiny sizes and print the tables they promise.

Numbers are not checked here (tests never check timings); what is checked is that each script
still runs against the current API and prints the rows a reader of the docs expects.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_benchmark(script: str, *args: str, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def table_rows(output: str, first_cell: str) -> list[list[str]]:
    """The cells of every markdown table row whose first cell is ``first_cell``."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in output.splitlines() if "|" in line]
    return [row for row in rows if row[0] == first_cell]


@pytest.mark.parametrize("rule", ["lstm-mnist-momentum", "lstm-mnist-gain"])
def test_agreement_probe_prints_the_cues_and_the_loss_curve(rule):
    out = run_benchmark(
        "agreement_probe.py", "--rule", rule, "--tasks", "mnist-mlp", "--lrs", "1", "--steps", "4", "--seeds", "1"
    )
    assert "cosine, per tensor" in out and "log norm ratio, per tensor" in out and "step response, per tensor" in out
    cue_rows = table_rows(out, "mnist-mlp")
    assert len(cue_rows) == 4  # cosine, ratio, response, loss curve
    tensors = cue_rows[0][2].split(" / ")
    assert len(tensors) == 4  # two weights, two biases
    assert all(-1.0 <= float(c) <= 1.0 for c in tensors)  # cosines
    # step 1 (the second) is the first with a last update to respond to
    assert all(math.isfinite(float(c)) and float(c) != 0.0 for c in cue_rows[2][2].split(" / "))
    assert float(cue_rows[3][2]) > 0  # loss at step 0


def test_step_time_times_every_path_against_adam():
    out = run_benchmark("step_time.py", "--sizes", "10K", "--repeats", "1", "--threads", "1", "--no-hrnn")
    paths = {row[1] for row in table_rows(out, "10K")}
    assert "AdamW foreach" in paths and "LSTM eager, fp32 state" in paths and "LSTM naive loop" in paths


def test_quality_compares_a_rule_with_tuned_baselines(tmp_path):
    out = run_benchmark(
        "quality.py",
        "--rules",
        "lstm-quadratic",
        "--problems",
        "quadratic",
        "--seeds",
        "1",
        "--out",
        str(tmp_path / "out"),
        "--cache",
        str(tmp_path / "cache"),
    )
    assert {row[0] for row in table_rows(out, "adam") + table_rows(out, "nesterov")} == {"adam", "nesterov"}
    (summary,) = table_rows(out, "lstm-quadratic")[-1:]
    assert summary[1] == "quadratic" and float(summary[3]) > 0  # (a) ratio


@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        ("quadratic_bound.py", ["--seeds", "2", "--steps", "5"], "conjugate gradient"),
        ("state_dtype_drift.py", ["--steps", "3"], "final whole-training-split loss"),
        ("lr_trace.py", ["--rule", "hrnn-base", "--steps", "3", "--every", "2"], "learning rate per tensor"),
        ("loss_scale.py", ["--tasks", "quadratic", "--scales", "0.1,1", "--seeds", "1", "--steps", "3"], "worst (b)"),
        ("meta_fit_speed.py", ["--instances", "2", "--steps", "3", "--iterations", "1", "--repeats", "1"], "speed-up"),
        ("sharded_step.py", ["--size", "10K", "--repeats", "1", "--rules", "hrnn-base"], "| hrnn-base | cpu |"),
    ],
)
def test_small_benchmarks_run(script, args, expected):
    assert expected in run_benchmark(script, *args)


def test_zero_grad_drift_shows_the_shipped_rules_hold_still_and_the_old_behaviour_drift():
    out = run_benchmark("zero_grad_drift.py", "--rules", "default,hrnn-base", "--size", "50", "--zero-steps", "30")
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in out.splitlines() if "|" in line}
    for name in ("default", "hrnn-base"):
        assert rows[(name, "False")].split("|")[3].strip() == "0"
        assert float(rows[(name, "True")].split("|")[3]) > 0
    assert float(rows[("adam lr 0.001", "-")].split("|")[3]) > 0


def test_schedule_reference_lists_distinct_schedules():
    out = run_benchmark("schedule_reference.py", "--steps", "5", "--seeds", "1", "--search-seeds", "1")
    assert len(table_rows(out, "constant lr")) == 1
    scheduled = table_rows(out, "late decay")
    assert len(scheduled) == 3 and len({tuple(row[1:5]) for row in scheduled}) == 3


def test_model_card_writes_a_card_with_the_command_and_an_evaluation_table(tmp_path):
    import shutil

    from learned_optim.weights import bundled_dir

    rule_dir = tmp_path / "my-rule"
    shutil.copytree(bundled_dir() / "lstm-quadratic", rule_dir)
    run_benchmark(
        "model_card.py",
        str(rule_dir),
        "--title",
        "A test card",
        "--problems",
        "quadratic:10",
        "--seeds",
        "1",
        "--cache",
        str(tmp_path / "cache"),
    )
    card = (rule_dir / "README.md").read_text()
    assert "A test card" in card and "learned-optim meta-fit --task quadratic" in card
    assert table_rows(card, "nesterov") and table_rows(card, "adam")


def test_model_card_without_title_prints_the_evaluation_and_leaves_the_card(tmp_path):
    import shutil

    from learned_optim.weights import bundled_dir

    rule_dir = tmp_path / "my-rule"
    shutil.copytree(bundled_dir() / "lstm-quadratic", rule_dir)
    card = (rule_dir / "README.md").read_bytes()
    # The evaluation command printed in every card, as written there.
    out = run_benchmark(
        "model_card.py", str(rule_dir), "--problems", "quadratic:10", "--seeds", "1", "--cache", str(tmp_path / "cache")
    )
    assert table_rows(out, "this rule") and table_rows(out, "nesterov")
    assert (rule_dir / "README.md").read_bytes() == card


def test_model_card_lists_earlier_stages_and_sums_their_times(tmp_path):
    import json
    import shutil

    from learned_optim.weights import bundled_dir

    first, rule_dir = tmp_path / "stage-1", tmp_path / "my-rule"
    for folder in (first, rule_dir):
        shutil.copytree(bundled_dir() / "lstm-quadratic", folder)
    config = json.loads((first / "config.json").read_text())
    config["metadata"].update(command="learned-optim meta-fit --task quadratic --out stage-1")
    config["metadata"]["meta_training_seconds"] = 100
    (first / "config.json").write_text(json.dumps(config))
    last = json.loads((rule_dir / "config.json").read_text())["metadata"]
    args = ["model_card.py", str(rule_dir), "--title", "Two stages", "--problems", "quadratic:5", "--seeds", "1"]
    run_benchmark(*args, "--cache", str(tmp_path / "cache"), "--before-run", str(first))
    card = (rule_dir / "README.md").read_text()
    commands = card.split("```")[1]
    assert commands.index("--out stage-1") < commands.index(last["command"])
    total = 100 + last["meta_training_seconds"]
    assert f"all 2 stages: 100 + {last['meta_training_seconds']:.0f} = {total:,.0f} s" in card
    # A folder that is not a meta-fit output is refused by name, before any evaluation.
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "model_card.py"), *args[1:], "--before-run", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and f"--before-run {tmp_path / 'nothing'}: cannot read" in result.stderr


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("step_time.py", ["--sizes", "0"], "expected a parameter count of at least 1, got '0'"),
        ("step_time.py", ["--sizes", "abc"], "expected a parameter count such as 1000, 10K or 1.5M, got 'abc'"),
        ("step_time.py", ["--repeats", "0"], "expected a positive integer, got '0'"),
        ("step_time.py", ["--lstm-config", "{bad"], "--lstm-config:"),
        ("quadratic_bound.py", ["--dim", "0"], "expected a positive integer, got '0'"),
        ("lr_trace.py", ["--every", "0"], "expected a positive integer, got '0'"),
        ("state_dtype_drift.py", ["--steps", "0"], "expected a positive integer, got '0'"),
        ("quality.py", ["--rules", "default", "--problems", "nope"], "--problems: unknown set(s) ['nope']"),
        ("quality.py", ["--rules", "default", "--lr-sweep", "mnist-mlp"], "expected task:steps such as mnist-mlp:100"),
        ("quality.py", ["--rules", "default", "--lr-sweep", "mnist-mpl:100"], "--lr-sweep: unknown task 'mnist-mpl'"),
        ("model_card.py", ["x", "--problems", "quadratic"], "--problems: expected task:steps"),
    ],
)
def test_bad_benchmark_options_are_usage_errors(script, args, message):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert message in result.stderr
