"""compare: the fair-comparison harness, its lr search, its errors, its cache, its reports."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import warnings

import matplotlib.image
import pytest
import torch
from tiny_tasks import Counter, half_square, make_tiny, tiny_sampler

from learned_optim import CoordinateLSTM
from learned_optim.compare import (
    BASELINES,
    Comparison,
    ResultCache,
    RunResult,
    check_grid,
    compare,
    run_once,
    tune_baseline,
)
from learned_optim.report import write_report
from learned_optim.tasks import TaskFamily, TaskInstance
from learned_optim.weights import PretrainedError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def small_rule(seed: int = 0) -> CoordinateLSTM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CoordinateLSTM(hidden_size=8)


def _reject_constant(name: str) -> None:
    raise AssertionError(f"JSON holds the non-standard token {name}")


def table_rows(table: str) -> list[list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


# ---------------------------------------------------------------------------- end to end
def test_end_to_end_table_and_report(tmp_path):
    task = make_tiny()
    result = compare(
        task,
        rules=[small_rule(0), small_rule(1)],
        steps=10,
        seeds=2,
        grid=(0.01, 0.1, 1.0, 1e6),  # 1e6 diverges: the report must cope with inf
        progress=False,
    )
    names = ["CoordinateLSTM", "CoordinateLSTM (2)", "adam", "rmsprop", "sgd", "nesterov"]
    assert [r.name for r in result.results] == names  # same-class rules get distinct names
    assert result.seeds == [2 * 10**8, 2 * 10**8 + 1]
    rows = table_rows(result.table())
    assert [row[0] for row in rows] == names
    assert all(len(row) == 10 for row in rows)
    for summary in result.results:
        assert len(summary.curves) == 2 and all(len(c) == 10 for c in summary.curves)
        assert math.isfinite(summary.final_loss) and math.isfinite(summary.test_loss)
    sgd = next(r for r in result.results if r.name == "sgd")
    assert sgd.grid["1e+06"]["final_loss"] == math.inf
    assert sgd.best_lr["final_loss"] in (0.01, 0.1, 1.0)
    # ratios are relative to the best baseline: the best one has ratio exactly 1
    best = min(r.final_loss for r in result.results if r.name in result.baselines)
    assert min(result.ratio(r.name, "final_loss") for r in result.results if r.name in result.baselines) == 1.0
    assert result.ratio("CoordinateLSTM", "final_loss") == pytest.approx(result.results[0].final_loss / best)

    paths = write_report(result, tmp_path / "report", command="learned-optim compare --test")
    assert sorted(p.suffix for p in paths) == [".json", ".md", ".png"]
    assert all(p.is_file() and p.parent == tmp_path / "report" for p in paths)
    md = next(p for p in paths if p.suffix == ".md").read_text()
    assert "learned-optim compare --test" in md
    assert all(f"| {name} |" in md for name in names)

    text = next(p for p in paths if p.suffix == ".json").read_text()
    data = json.loads(text, parse_constant=_reject_constant)
    assert data["task"] == "tiny" and data["steps"] == 10 and data["command"] == "learned-optim compare --test"
    assert [r["name"] for r in data["results"]] == names
    sgd_json = next(r for r in data["results"] if r["name"] == "sgd")
    assert sgd_json["grid"]["1e+06"]["final_loss"] == "inf"

    png = next(p for p in paths if p.suffix == ".png")
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.shape[2] in (3, 4)


def test_report_file_names_stay_in_the_output_folder(tmp_path):
    result = compare(make_tiny(name="my/task"), rules=[], steps=3, seeds=1, baselines=["sgd"], grid=(0.1,),
                     progress=False)  # fmt: skip
    paths = write_report(result, tmp_path)
    assert sorted(p.name for p in paths) == ["my_task-3.json", "my_task-3.md", "my_task-3.png"]
    assert all(p.parent == tmp_path for p in paths)


def test_comparison_without_baselines_still_tabulates():
    result = compare(make_tiny(), rules=[small_rule()], steps=5, seeds=1, baselines=(), progress=False)
    assert [row[0] for row in table_rows(result.table())] == ["CoordinateLSTM"]
    assert math.isnan(result.ratio("CoordinateLSTM", "final_loss"))


def test_no_ratio_when_every_baseline_diverged(tmp_path):
    # A finite loss over a best baseline of inf gave the ratio 0.00, which reads as a perfect score.
    from learned_optim.compare import OptimizerSummary

    inf = float("inf")
    per_seed = {"mean_loss": [inf], "final_loss": [inf], "test_loss": [inf]}
    rule = OptimizerSummary("rule", {"mean_loss": 1.0, "final_loss": 1.0}, 0.5, 0.25, 0.3, [[0.5, 0.25]], 0.1,
                            per_seed={"mean_loss": [0.5], "final_loss": [0.25], "test_loss": [0.3]})  # fmt: skip
    sgd = OptimizerSummary("sgd", {"mean_loss": None, "final_loss": None}, inf, inf, inf, [[inf]], 0.1, per_seed)
    result = Comparison(task="t", steps=2, seeds=[0], results=[rule, sgd], baselines=["sgd"])
    for metric in ("mean_loss", "final_loss"):
        assert math.isnan(result.ratio("rule", metric)) and math.isnan(result.ratio("sgd", metric))
    rows = table_rows(result.table())
    assert [(row[4], row[6]) for row in rows] == [("-", "-"), ("-", "-")]  # as a missing lr is shown
    (js,) = [p for p in write_report(result, tmp_path) if p.suffix == ".json"]
    ratios = json.loads(js.read_text(), parse_constant=_reject_constant)["ratios"]
    # "nan", as the JSON writes every other missing number (a held-out loss without a held-out split).
    assert ratios == {name: {"mean_loss": "nan", "final_loss": "nan"} for name in ("rule", "sgd")}


def test_wins_count_only_baselines():
    def summary(name, per_seed):
        return type("S", (), {"name": name, "per_seed": {"final_loss": per_seed}})()

    result = Comparison(
        task="t", steps=1, seeds=[0, 1], baselines=["sgd"],
        results=[summary("a", [1.0, 1.0]), summary("b", [0.5, 0.5]), summary("sgd", [2.0, 0.1])],
    )  # fmt: skip
    # "a" loses to the other learned rule "b" on both seeds but beats the baseline on seed 0.
    assert result.wins("a") == 1
    assert result.wins("sgd") == 2  # a baseline is compared with the other baselines only (none)
    with pytest.raises(ValueError, match=r"no optimizer 'c' in this comparison; it has \['a', 'b', 'sgd'\]"):
        result.wins("c")
    with pytest.raises(ValueError, match="unknown metric 'final'; choose from mean_loss, final_loss, test_loss"):
        result.ratio("a", "final")


# ---------------------------------------------------------------------------- lr search
def test_run_once_sgd_on_half_square_converges_in_one_step_at_lr_1():
    run = run_once(half_square(), 0, lambda p: torch.optim.SGD(p, lr=1.0), steps=5)
    assert run.losses[0] > 0 and run.losses[1:] == [0.0] * 4
    assert run.final_loss == 0.0 and run.mean_loss == pytest.approx(run.losses[0] / 5)


def test_lr_search_picks_the_known_best():
    grid = (0.01, 0.1, 1.0, 10.0)
    summary = tune_baseline("sgd", BASELINES["sgd"], half_square(), "half-square", [0, 1], 10, grid)
    assert summary.best_lr == {"mean_loss": 1.0, "final_loss": 1.0}
    assert summary.final_loss == 0.0
    assert sorted(float(lr) for lr in summary.grid) == list(grid)  # best was interior: no widening

    result = compare(half_square(), rules=[], steps=10, seeds=2, baselines=["sgd"], grid=grid, progress=False)
    assert result.results[0].best_lr["final_loss"] == 1.0


def test_lr_search_widens_past_an_edge():
    # f = 15 ||θ||²: the best SGD lr is 1/30; the initial grid (1e-3, 3e-3) is far below it.
    family = half_square(scale=30.0)
    result = compare(family, rules=[], steps=10, seeds=2, baselines=["sgd"], grid=(1e-3, 3e-3), progress=False)
    sgd = result.results[0]
    lrs = sorted(float(lr) for lr in sgd.grid)
    assert lrs[0] == 1e-3  # nothing below: the low edge was never best
    assert lrs[-1] > 3e-3 * 10  # widened upward by several half-decades
    for metric in ("mean_loss", "final_loss"):
        best = sgd.best_lr[metric]
        assert lrs[0] < best < lrs[-1], (metric, best, lrs)  # interior
        assert best == pytest.approx(0.03)

    # max_widen bounds the search, and says so when the best is still at the edge.
    with pytest.warns(RuntimeWarning, match="still at the edge of the grid after widening it 1 times"):
        capped = tune_baseline("sgd", BASELINES["sgd"], family, "hs30", [0], 10, (1e-3, 3e-3), max_widen=1)
    assert len(capped.grid) == 3


def test_progress_bar_total_grows_with_the_widened_grid(monkeypatch):
    # The total counted the initial grid only: widening ran past it (the bar ended above 100%).
    import io

    import tqdm.auto
    import tqdm.std

    bars = []

    def recording_tqdm(*args, **kwargs):
        bars.append(tqdm.std.tqdm(*args, **{**kwargs, "file": io.StringIO()}))
        return bars[-1]

    monkeypatch.setattr(tqdm.auto, "tqdm", recording_tqdm)
    family = half_square(scale=30.0)  # best SGD lr 1/30: the grid (1e-3, 3e-3) is widened upward
    result = compare(family, rules=[small_rule()], steps=3, seeds=2, baselines=["sgd"], grid=(1e-3, 3e-3))
    (bar,) = bars
    runs = 2 * (1 + len(result.results[1].grid))
    assert len(result.results[1].grid) > 2
    assert bar.n == bar.total == runs


def test_repeated_widening_lands_on_exact_half_decades():
    family = half_square(scale=1e-5)  # best SGD lr ~1e5: far above the default grid
    with pytest.warns(RuntimeWarning, match="still at the edge"):
        summary = tune_baseline("sgd", BASELINES["sgd"], family, "hs-tiny", [0], 3, max_widen=4)
    assert {"100", "1000", "31.6228", "316.228"} <= set(summary.grid)


def _tiny_with(
    train_x=None, dropout: float = 0.0, loss_scale: float = 1.0, freeze_first: bool = False, norm_momentum=None
):
    from tiny_tasks import TEST_X, TEST_Y, TRAIN_X, TRAIN_Y
    from torch import nn

    from learned_optim.tasks import Task

    def model():
        norm = [] if norm_momentum is None else [nn.BatchNorm1d(8, momentum=norm_momentum)]
        net = nn.Sequential(nn.Linear(3, 8), *norm, nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 1))
        net[0].requires_grad_(not freeze_first)
        return net

    x = TRAIN_X if train_x is None else train_x
    return Task(
        model=model,
        loss=lambda out, y: loss_scale * nn.functional.mse_loss(out, y),
        data=tiny_sampler,
        train_set=(x, TRAIN_Y),
        test_set=(TEST_X, TEST_Y),
        name="tiny-variant",
    )


@pytest.mark.parametrize(
    "change",
    ["baseline settings", "training split", "loss", "frozen layer", "module setting"],
)
def test_the_cache_never_reuses_runs_of_a_changed_setup(tmp_path, change):
    # The last two change neither the initial values, the data nor the first loss.
    from learned_optim.compare import Baseline, task_fingerprint

    cache_path = tmp_path / "cache.json"
    family = _tiny_with(norm_momentum=0.1 if change == "module setting" else None)
    first = tune_baseline(
        "nesterov", Baseline(torch.optim.SGD, (("momentum", 0.9),)), family,
        f"t#{task_fingerprint(family, 0)}", [0], 5, (0.1,), cache=ResultCache(cache_path), max_widen=0,
    )  # fmt: skip
    factory = Baseline(torch.optim.SGD, (("momentum", 0.5 if change == "baseline settings" else 0.9),))
    if change == "training split":
        family = _tiny_with(train_x=torch.zeros(128, 3))
    if change == "loss":
        family = _tiny_with(loss_scale=10.0)
    if change == "frozen layer":
        family = _tiny_with(freeze_first=True)
    if change == "module setting":
        family = _tiny_with(norm_momentum=0.9)
    cache = ResultCache(cache_path)
    key = f"t#{task_fingerprint(family, 0)}"
    fresh = tune_baseline("nesterov", factory, family, key, [0], 5, (0.1,), cache=cache, max_widen=0)
    uncached = run_once(family, 0, lambda p: factory(p, 0.1), 5)
    assert fresh.final_loss == uncached.final_loss
    assert fresh.final_loss != first.final_loss


def test_runs_with_random_layers_repeat_and_are_scored_in_eval_mode():
    family = _tiny_with(dropout=0.5)
    make = lambda p: torch.optim.SGD(p, lr=0.1)  # noqa: E731
    state = torch.get_rng_state()
    a, b = run_once(family, 0, make, 20), run_once(family, 0, make, 20)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left as it was
    assert a.losses == b.losses and a.final_loss == b.final_loss  # dropout masks repeat
    # (b) is the eval-mode loss: deterministic, no dropout
    instance = family.sample(0)
    with torch.no_grad():
        instance.model.eval()
        eval_losses = {float(instance.loss(instance.model(instance.train_set[0]), instance.train_set[1])) for _ in "ab"}
    assert len(eval_losses) == 1


def test_a_non_finite_gradient_ends_the_run_for_every_optimizer():
    from learned_optim.tasks import Task

    class InfGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return torch.full_like(grad, float("inf"))

    def loss(output, target):
        return torch.nn.functional.mse_loss(InfGradient.apply(output), target)

    family = Task(model=lambda: torch.nn.Linear(3, 1), loss=loss, data=tiny_sampler, name="inf-grad")
    for make in (lambda p: torch.optim.Adam(p, lr=0.01), lambda p: __import__("learned_optim").LearnedOptimizer(p)):
        run = run_once(family, 0, make, 5)
        assert run.final_loss == math.inf and run.mean_loss == math.inf  # the rule does not get to skip it


# ---------------------------------------------------------------------------- errors
@pytest.fixture
def counted():
    counter = Counter()
    return counter, make_tiny(model=counter)


def test_bad_task_name():
    with pytest.raises(ValueError, match="unknown task 'no-such-task'"):
        compare("no-such-task", rules=[], progress=False)


@pytest.mark.parametrize(
    ("setting", "message"),
    [({"steps": 0}, "steps must be a positive integer, got 0"), ({"seeds": 0}, "seeds must be a positive number")],
)
def test_no_steps_or_no_seeds_fail_before_any_run(counted, setting, message):
    counter, task = counted
    settings = {"steps": 2, "seeds": 1, **setting}
    with pytest.raises(ValueError, match=message):
        compare(task, rules=[small_rule()], baselines=["sgd"], progress=False, **settings)
    assert counter.calls == 0


def test_bad_baseline_name_fails_before_any_run(counted):
    counter, task = counted
    with pytest.raises(ValueError, match=r"unknown baseline\(s\) \['adamw'\]"):
        compare(task, rules=[small_rule()], baselines=["sgd", "adamw"], steps=2, seeds=1, progress=False)
    assert counter.calls == 0


def test_missing_rule_fails_before_any_run(counted):
    counter, task = counted
    with pytest.raises(PretrainedError, match="no-such-dir"):
        compare(task, rules=[small_rule(), "./no-such-dir"], baselines=["sgd"], steps=2, seeds=1, progress=False)
    assert counter.calls == 0


def test_corrupt_rule_fails_before_any_run(counted, tmp_path):
    counter, task = counted
    folder = tmp_path / "rule"
    small_rule().save_pretrained(str(folder))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(PretrainedError, match="not valid JSON"):
        compare(task, rules=[str(folder)], baselines=["sgd"], steps=2, seeds=1, progress=False)
    assert counter.calls == 0


@pytest.mark.parametrize(
    "grid",
    [[], [0.0], [float("nan")], [-1.0, 0.1], [0.1, float("inf")], "0.1", ["0.1"]],
    ids=["empty", "zero", "nan", "negative", "inf", "str", "str-item"],
)
def test_bad_grid_fails_before_any_run(counted, grid):
    # An empty grid failed in min() after the rule had run; 0 and NaN were "tuned" and reported.
    counter, task = counted
    with pytest.raises(ValueError, match=r"^grid(:| must)"):
        compare(task, rules=[small_rule()], baselines=["sgd"], grid=grid, steps=2, seeds=1, progress=False)
    assert counter.calls == 0
    with pytest.raises(ValueError, match=r"^grid(:| must)"):
        tune_baseline("sgd", BASELINES["sgd"], task, "tiny", [0], 2, grid=grid)
    assert counter.calls == 0


def test_check_grid_messages_and_accepted_forms():
    with pytest.raises(ValueError, match=r"grid must be a non-empty list of learning rates \(finite numbers > 0\)"):
        check_grid([])
    with pytest.raises(ValueError, match=r"grid: every learning rate must be a finite number > 0, got \[0.0, -1\]"):
        check_grid([0.0, 0.1, -1])
    assert check_grid(0.1) == [0.1]  # one number: a one-point grid
    assert check_grid((0.1, 1, 0.1)) == [0.1, 1]  # a repeated point would count twice in the progress total


def test_rule_names_of_the_wrong_length_fail_before_any_run(counted):
    counter, task = counted
    with pytest.raises(ValueError, match=r"rule_names has 2 names for 1 rules; give one per rule"):
        compare(task, rules=[small_rule()], rule_names=["a", "b"], baselines=["sgd"], steps=2, seeds=1,
                progress=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"rule_names has 1 names for 2 rules"):
        compare(task, rules=[small_rule(), small_rule()], rule_names=["a"], steps=2, seeds=1, progress=False)
    assert counter.calls == 0


def test_a_single_string_or_rule_is_one_item_not_a_sequence():
    # "lstm-mnist" was iterated letter by letter ("'l' is not a bundled rule"), "sgd" as ['s', 'g', 'd'].
    task = make_tiny()
    result = compare(task, rules="lstm-mnist", baselines="sgd", grid=(0.1,), steps=2, seeds=1, progress=False)
    assert [r.name for r in result.results] == ["lstm-mnist", "sgd"] and result.baselines == ["sgd"]
    result = compare(task, rules=small_rule(), rule_names="mine", baselines=(), steps=2, seeds=1, progress=False)
    assert [r.name for r in result.results] == ["mine"]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"rule_lrs": "0.3"}, "rule_lrs must be a number or a list of numbers, got the str '0.3'"),
        ({"rule_lrs": ["fast"]}, r"rule_lrs must be a number or a list of numbers, got \['fast'\]"),
        ({"seeds": "3"}, "seeds must be a positive number of seeds or a non-empty list, got '3'"),
    ],
)
def test_strings_where_numbers_belong_fail_before_any_run(counted, setting, message):
    counter, task = counted
    with pytest.raises(ValueError, match=message):
        compare(task, rules=[small_rule()], baselines=["sgd"], **{"steps": 2, "seeds": 1, **setting}, progress=False)
    assert counter.calls == 0


@pytest.mark.parametrize(
    ("seeds", "error", "message"),
    [
        # 1.5 ran seed 1 and was reported as 1.5; "a" failed deep inside the task.
        ([1.5], TypeError, r"seeds must be integers, got \[1.5\]"),
        (["a"], TypeError, r"seeds must be integers, got \['a'\]"),
        ([True], TypeError, r"seeds must be integers, got \[True\]"),
        (1.5, TypeError, "seeds must be a number of seeds or a list of integer seeds, got float"),
        ([3, 3, 4], ValueError, r"seeds must be distinct, got \[3\] more than once"),
    ],
)
def test_seeds_that_are_not_distinct_integers_fail_before_any_run(counted, seeds, error, message):
    counter, task = counted
    with pytest.raises(error, match=message):
        compare(task, rules=[small_rule()], baselines=["sgd"], steps=2, seeds=seeds, progress=False)
    assert counter.calls == 0


def test_a_cache_path_that_cannot_be_a_file_fails_before_any_run(counted, tmp_path):
    # A folder ran everything, then failed with IsADirectoryError and left a stray .lock file.
    counter, task = counted
    (tmp_path / "afile").write_text("x")
    for path, message in [(tmp_path, "is a folder"), (tmp_path / "afile" / "c.json", "afile is not a folder")]:
        with pytest.raises(ValueError, match=f"cache_path .*{message}"):
            compare(task, rules=[], baselines=["sgd"], steps=2, seeds=1, cache_path=path, progress=False)
    assert counter.calls == 0
    assert sorted(os.listdir(tmp_path)) == ["afile"]


@pytest.mark.parametrize("task", [5, None, [make_tiny()]], ids=["int", "none", "list"])
def test_a_task_of_the_wrong_kind_is_a_type_error(task):
    # 5 gave "AttributeError: 'int' object has no attribute 'sample'".
    with pytest.raises(TypeError, match=r"^task must be a task name \(str\), a Task or a TaskFamily, got "):
        compare(task, rules=[], baselines=["sgd"], steps=2, seeds=1, progress=False)


# ---------------------------------------------------------------------------- cache
def _numbers(result: Comparison) -> list[tuple]:
    return [(r.name, r.best_lr, r.mean_loss, r.final_loss, r.test_loss, r.curves, r.per_seed) for r in result.results]


def test_cache_skips_baseline_reruns(counted, tmp_path):
    counter, task = counted
    cache_path = tmp_path / "cache" / "tiny.json"
    settings = dict(steps=5, seeds=2, grid=(0.01, 0.1, 1.0), baselines=["sgd", "adam"], cache_path=cache_path,
                    progress=False)  # fmt: skip
    first = compare(task, rules=[small_rule()], **settings)
    first_calls = counter.calls
    assert first_calls >= 2 * (1 + 2 * 3)  # the rule and every baseline lr, on two seeds
    assert cache_path.is_file()
    assert len(json.loads(cache_path.read_text())) == sum(len(r.grid) for r in first.results[1:]) * 2

    counter.calls = 0
    second = compare(task, rules=[small_rule()], **settings)
    # Only the learned rule ran again (once per seed), plus one instance for the task's fingerprint.
    assert counter.calls == 3
    assert _numbers(second) == _numbers(first)
    assert [r.grid for r in second.results] == [r.grid for r in first.results]

    # Another cache object reading the same file sees the same runs.
    cache = ResultCache(cache_path)
    assert len(cache.data) == len(json.loads(cache_path.read_text()))


def test_tasks_that_share_a_name_do_not_share_cached_runs(tmp_path):
    def shifted_sampler(generator):
        x, y = tiny_sampler(generator)
        return x, y + 3.0  # other targets, same name, same model

    settings = dict(steps=5, seeds=2, grid=(0.1, 1.0), baselines=["sgd"], cache_path=tmp_path / "cache.json",
                    progress=False)  # fmt: skip
    first = compare(make_tiny(name="mine"), rules=[], **settings)
    counter = Counter()
    other = compare(make_tiny(name="mine", model=counter, data=shifted_sampler), rules=[], **settings)
    assert counter.calls > 1 + 2  # its baselines ran instead of coming from the cache
    assert other.results[0].mean_loss != first.results[0].mean_loss
    # Both tasks' runs are kept, side by side (each lr of each grid, on two seeds).
    entries = len(ResultCache(tmp_path / "cache.json").data)
    assert entries == 2 * (len(first.results[0].grid) + len(other.results[0].grid))


def test_caches_sharing_a_file_keep_each_others_runs(tmp_path):
    # Two comparisons running side by side, each with its own view of one cache file.
    path = tmp_path / "cache.json"
    first, second = ResultCache(path), ResultCache(path)
    first.put("a", RunResult([1.0], 1.0, 1.0, 1.5, 0.1))
    second.put("b", RunResult([2.0], 2.0, 2.0, 2.5, 0.2))
    first.save()
    second.save()
    assert ResultCache(path).get("a") == RunResult([1.0], 1.0, 1.0, 1.5, 0.1)
    assert ResultCache(path).get("b") == RunResult([2.0], 2.0, 2.0, 2.5, 0.2)
    # No temporary files left; the lock file stays (POSIX).
    assert sorted(p.name for p in tmp_path.iterdir()) in (["cache.json"], [".cache.json.lock", "cache.json"])


def _save_one_at_a_time(path, prefix, count, start):
    start.wait()
    for i in range(count):
        cache = ResultCache(path)
        cache.put(f"{prefix}{i}", RunResult([float(i)], 1.0, 1.0, 1.5, 0.1))
        cache.save()


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork (POSIX)")
def test_concurrent_saves_lose_no_runs(tmp_path):
    # Processes that each read, merge and write the shared file many times at once: without
    # a lock around the merge, one overwrites runs the other saved between its read and write.
    path, count = tmp_path / "cache.json", 60
    context = multiprocessing.get_context("fork")
    start = context.Barrier(3)
    workers = [context.Process(target=_save_one_at_a_time, args=(path, p, count, start)) for p in "ab"]
    for worker in workers:
        worker.start()
    start.wait()
    for worker in workers:
        worker.join(timeout=600)  # generous: a loaded 2-core machine is slow, not wrong
        assert worker.exitcode == 0
    assert sorted(ResultCache(path).data) == sorted(f"{p}{i}" for p in "ab" for i in range(count))


def test_corrupt_cache_is_ignored(tmp_path):
    path = tmp_path / "cache.json"
    path.write_text("{broken")
    assert ResultCache(path).data == {}


@pytest.mark.parametrize(
    "spoil",
    [
        lambda e: {**e, "bogus": 1},
        lambda e: {k: v for k, v in e.items() if k != "test_loss"},
        lambda e: {**e, "mean_loss": "low"},
        lambda e: {**e, "losses": "abc"},
        lambda e: {**e, "losses": [0.5, None]},
        lambda e: 5,
    ],
    ids=["extra-field", "missing-field", "str-metric", "str-losses", "null-loss", "not-a-dict"],
)
def test_a_malformed_cache_entry_is_rerun_and_overwritten(counted, tmp_path, spoil):
    # A bad entry crashed the run (RunResult got an unexpected keyword) while a corrupt file was tolerated.
    counter, task = counted
    path = tmp_path / "cache.json"
    settings = dict(rules=[], steps=3, seeds=1, baselines=["sgd"], grid=(0.1,), cache_path=path, progress=False)
    first = compare(task, **settings)
    good = json.loads(path.read_text())
    path.write_text(json.dumps({key: spoil(entry) for key, entry in good.items()}))
    counter.calls = 0
    again = compare(task, **settings)
    assert counter.calls == 1 + len(good)  # the fingerprint's instance, then a rerun of each bad entry
    assert _numbers(again) == _numbers(first)
    assert json.loads(path.read_text()).keys() == good.keys()
    assert all(isinstance(ResultCache(path).get(key), RunResult) for key in good)  # hits again
    # Rewritten well-formed: the seconds differ, what was measured does not.
    rewritten = json.loads(path.read_text())
    assert [{k: v for k, v in e.items() if k != "seconds"} for e in rewritten.values()] == [
        {k: v for k, v in e.items() if k != "seconds"} for e in good.values()
    ]


# ---------------------------------------------------------------------------- every lr diverges
class _Explodes(torch.nn.Module):
    """Its output is inf from the first step: every optimizer at every lr diverges."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.w * x.sum(1, keepdim=True) * float("inf")


class _ExplodingFamily(TaskFamily):
    """A TaskFamily, not a Task: a Task refuses a model whose loss is inf at initialisation."""

    name = "explodes"

    def __init__(self, test_set: bool) -> None:
        self.test_set = test_set

    def sample(self, seed: int) -> TaskInstance:
        from tiny_tasks import TEST_X, TEST_Y, TRAIN_X, TRAIN_Y

        generator = torch.Generator().manual_seed(seed)
        return TaskInstance(
            model=_Explodes(),
            loss=torch.nn.functional.mse_loss,
            batches=iter(lambda: tiny_sampler(generator), None),
            train_set=(TRAIN_X, TRAIN_Y),
            test_set=(TEST_X, TEST_Y) if self.test_set else None,
            name="explodes",
        )


def _exploding_task(test_set: bool) -> _ExplodingFamily:
    return _ExplodingFamily(test_set)


@pytest.mark.parametrize("test_set", [True, False], ids=["with-test-set", "no-test-set"])
def test_held_out_loss_of_diverged_runs_is_inf_and_nan_only_without_a_test_set(test_set):
    # A diverged learned rule showed held-out "nan" (read: no held-out split) on a task with one,
    # and an all-diverged baseline "inf" on a task without one, while its grid said "nan".
    task = _exploding_task(test_set)
    with pytest.warns(RuntimeWarning, match="sgd diverged at every learning rate"):
        result = compare(task, rules=[small_rule()], steps=2, seeds=1, baselines=("sgd",), grid=(0.1,), progress=False)
    expected = float("inf") if test_set else float("nan")
    for summary in result.results:
        assert math.isinf(summary.mean_loss) and math.isinf(summary.final_loss)
        assert str(summary.test_loss) == str(expected), summary.name
        assert all(str(v["test_loss"]) == str(expected) for v in summary.grid.values())
    sgd = result.results[1]
    assert sgd.best_lr == {"mean_loss": None, "final_loss": None}


def test_report_of_an_all_diverged_comparison_plots_without_warnings(tmp_path):
    # No finite curve left nothing to plot: matplotlib warned about the empty legend.
    import warnings

    with pytest.warns(RuntimeWarning, match="sgd diverged at every learning rate"):
        result = compare(
            _exploding_task(True), rules=[small_rule()], steps=2, seeds=1, baselines=("sgd",), grid=(0.1,),
            progress=False,
        )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = write_report(result, tmp_path)
    png = next(p for p in paths if p.suffix == ".png")
    assert png.read_bytes()[:8] == PNG_SIGNATURE


def test_curves_without_a_positive_loss_plot_on_a_linear_scale_without_warnings(tmp_path):
    import warnings

    from learned_optim.compare import OptimizerSummary
    from learned_optim.report import plot_curves

    # A loss that is never positive (e.g. a negative log-likelihood) cannot be log-scaled.
    summary = OptimizerSummary("rule", {"final_loss": 1.0}, -1.5, -2.0, -2.0, [[-1.0, -2.0]], 0.1)
    result = Comparison(task="t", steps=2, seeds=[0], results=[summary], baselines=[])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot_curves(result, tmp_path / "curves.png") == tmp_path / "curves.png"


def test_every_lr_diverging_warns_so_not_that_the_best_is_at_an_edge():
    task = _exploding_task(True)
    with pytest.warns(RuntimeWarning, match="diverged at every learning rate") as caught:
        tune_baseline("sgd", BASELINES["sgd"], task, "explodes", [0], 2, grid=(0.1, 1.0), max_widen=1)
    assert not any("edge of the grid" in str(w.message) for w in caught)


def test_a_one_step_run_ties_at_every_lr_and_widens_nothing():
    # (a) of a 1-step run is the loss before any step: the same at every lr, so no edge is best;
    # (b) is best at lr 1, inside the grid.
    grid = (0.1, 1.0, 10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = tune_baseline("sgd", BASELINES["sgd"], half_square(), "half-square", [0], 1, grid)
    assert sorted(float(lr) for lr in summary.grid) == list(grid)


def test_a_float16_model_is_not_reported_as_diverged():
    # Its weights sum past float16's largest value (65504); every one of them is finite.
    from tiny_tasks import TEST_X, TEST_Y, TRAIN_X, TRAIN_Y
    from torch import nn

    from learned_optim.tasks import Task

    def model():
        net = nn.Sequential(nn.Linear(3, 4096), nn.Tanh(), nn.Linear(4096, 1)).half()
        with torch.no_grad():
            net[0].weight.fill_(20.0)
        return net

    family = Task(
        model=model,
        loss=lambda out, y: nn.functional.mse_loss(out.float(), y),
        data=lambda g: (torch.randn(16, 3, generator=g).half(), torch.zeros(16, 1)),
        train_set=(TRAIN_X.half(), TRAIN_Y),
        test_set=(TEST_X.half(), TEST_Y),
        name="half",
    )
    run = run_once(family, 0, lambda p: torch.optim.SGD(p, lr=0.0), steps=2)
    assert math.isfinite(run.mean_loss) and math.isfinite(run.final_loss)


def test_repeated_baselines_and_path_rules(tmp_path):
    with pytest.raises(ValueError, match=r"baselines: \['sgd'\] given more than once"):
        compare(half_square(), rules=[], steps=2, seeds=1, baselines=["sgd", "sgd"], progress=False)
    folder = tmp_path / "my-rule"
    small_rule().save_pretrained(folder)
    result = compare(half_square(), rules=[folder], steps=2, seeds=1, baselines=[], progress=False)
    assert result.results[0].name == str(folder)  # the path, not "PosixPath"


def test_plotting_leaves_the_matplotlib_backend_alone(tmp_path):
    import matplotlib

    from learned_optim.report import plot_curves

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        result = compare(half_square(), rules=[], steps=3, seeds=1, baselines=["sgd"], progress=False)
        assert plot_curves(result, tmp_path / "curves.png").read_bytes().startswith(PNG_SIGNATURE)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
