"""Fair comparison of learned rules against hand-designed optimizers at their best learning rate.

Protocol: every optimizer runs on the same task instances (a seed fixes the initialisation
and the minibatch order); each baseline is run on a half-decade learning-rate grid that is
widened until its best point is not at an edge, and is reported at its best learning rate
*for each metric separately*. Metrics per run: (a) mean training minibatch loss over the
run, (b) loss on the whole training split after the last step, (c) held-out loss.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: saves are still atomic, only concurrent merges are unguarded
    fcntl = None

import torch
from torch import nn

from learned_optim.tasks import TaskFamily, TaskInstance, call_model, get_task, sample_instance
from learned_optim.tasks._common import EVALUATION_SEED_BASE, derive_seed

__all__ = [
    "BASELINES",
    "DEFAULT_GRID",
    "EVALUATION_SEED_BASE",
    "METRICS",
    "Baseline",
    "Comparison",
    "OptimizerSummary",
    "ResultCache",
    "RunResult",
    "check_grid",
    "compare",
    "evaluate_rule",
    "half_decade",
    "run_once",
    "task_fingerprint",
    "tune_baseline",
]

OptimizerFactory = Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]


@dataclass(frozen=True)
class Baseline:
    """A hand-designed optimizer at a given lr: ``Baseline(torch.optim.SGD, {"momentum": 0.9})(params, lr)``.

    Its ``repr`` (class and settings) is part of the cache key, so changing a setting never
    reuses runs made with the old one.
    """

    optimizer: type[torch.optim.Optimizer]
    settings: tuple[tuple[str, Any], ...] = ()

    def __call__(self, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        return self.optimizer(params, lr=lr, **dict(self.settings))

    def __repr__(self) -> str:
        return f"{self.optimizer.__module__}.{self.optimizer.__qualname__}{dict(self.settings)}"


BASELINES: dict[str, OptimizerFactory] = {
    "adam": Baseline(torch.optim.Adam),
    "rmsprop": Baseline(torch.optim.RMSprop),
    "sgd": Baseline(torch.optim.SGD),
    "nesterov": Baseline(torch.optim.SGD, (("momentum", 0.9), ("nesterov", True))),
}


def half_decade(exponent: int) -> float:
    """``10 ** (exponent / 2)`` to 9 significant digits (the grid's learning rates)."""
    return float(f"{10 ** (exponent / 2):.9g}")


# Half-decades from 1e-4 to 10; widened automatically when the best lr sits at an edge.
DEFAULT_GRID = tuple(half_decade(k) for k in range(-8, 3))
METRICS = ("mean_loss", "final_loss", "test_loss")
# Part of every cache key: bump when what a run measures changes (runs cached before are ignored).
PROTOCOL_VERSION = 3  # 3: a diverged run's held-out loss is NaN when the task has no test_set


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")


@dataclass
class RunResult:
    """One optimizer on one task instance."""

    losses: list[float]
    mean_loss: float
    final_loss: float
    test_loss: float
    seconds: float


@dataclass
class OptimizerSummary:
    """One optimizer over all seeds, at its best learning rate per metric."""

    name: str
    best_lr: dict[str, float | None]
    mean_loss: float
    final_loss: float
    test_loss: float
    curves: list[list[float]]
    seconds: float
    per_seed: dict[str, list[float]] = field(default_factory=dict)
    grid: dict[str, dict[str, float]] = field(default_factory=dict)


def _finite_or_inf(x: float) -> float:
    return x if math.isfinite(x) else float("inf")


@torch.no_grad()
def _split_loss(instance: TaskInstance, model: nn.Module, split: Any) -> float:
    if split is None:
        return float("nan")
    inputs, targets = split
    return _finite_or_inf(float(instance.loss(call_model(model, inputs), targets)))


def _gradients_finite(model: nn.Module) -> bool:
    grads = [p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.cat(grads)).all())


def run_once(
    family: TaskFamily,
    seed: int,
    make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    steps: int,
) -> RunResult:
    """Train one instance of ``family`` for ``steps`` steps with an ordinary training loop.

    The same for every optimizer: a run whose loss or gradient turns non-finite has diverged
    (whatever the optimizer would do with it); the global RNG is seeded from ``seed`` (dropout
    and other random layers repeat, and the caller's RNG is left as it was); the whole-split
    losses are taken in eval mode.
    """
    instance = sample_instance(family, seed)
    model = instance.model
    optimizer = make_optimizer(model.parameters())
    losses: list[float] = []
    diverged = False
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "compare/training"))
        for _ in range(steps):
            inputs, targets = instance.next_batch()
            optimizer.zero_grad(set_to_none=True)
            loss = instance.loss(call_model(model, inputs), targets)
            value = float(loss.detach())
            if not math.isfinite(value):
                diverged = True
                break
            loss.backward()
            if not _gradients_finite(model):
                diverged = True
                break
            optimizer.step()
            losses.append(value)
    seconds = time.perf_counter() - start
    # isfinite per element: a sum in a float16 model's own dtype overflows past 65504.
    if diverged or not all(bool(torch.isfinite(p.detach()).all()) for p in model.parameters()):
        # NaN, not inf, without a held-out split: "no such metric", as for a run that converged.
        test = float("inf") if instance.test_set is not None else float("nan")
        return RunResult([*losses, float("inf")], float("inf"), float("inf"), test, seconds)
    was_training = model.training
    model.eval()
    train = instance.train_set
    final = _split_loss(instance, model, train)
    if train is None:  # no whole split: the loss on the next minibatch stands in for it
        inputs, targets = instance.next_batch()
        with torch.no_grad():
            final = _finite_or_inf(float(instance.loss(call_model(model, inputs), targets)))
    test = _split_loss(instance, model, instance.test_set)
    model.train(was_training)
    return RunResult(losses, sum(losses) / len(losses), final, test, seconds)


_RUN_FIELDS = frozenset(RunResult.__dataclass_fields__)


def _is_number(x: Any) -> bool:
    # bool is an int, but no run measures one.
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


class ResultCache:
    """JSON cache of baseline runs so that reruns of a comparison are quick."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None
        self.data: dict[str, Any] = self._read()

    def _read(self) -> dict[str, Any]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return {}  # a corrupt cache is only a cache: start over
        return data if isinstance(data, dict) else {}

    @staticmethod
    def key(*parts: Any) -> str:
        """Cache key of a run (task, optimizer, lr, seed, steps)."""
        return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def get(self, key: str) -> RunResult | None:
        """The cached run, or None (also for an entry that is not a well-formed run: it is rerun
        and overwritten, as a corrupt cache file is started over)."""
        hit = self.data.get(key)
        if not isinstance(hit, dict) or set(hit) != _RUN_FIELDS:
            return None
        if not (isinstance(hit["losses"], list) and all(_is_number(x) for x in hit["losses"])):
            return None
        if not all(_is_number(hit[name]) for name in _RUN_FIELDS - {"losses"}):
            return None
        return RunResult(**hit)

    def put(self, key: str, result: RunResult) -> None:
        """Remember a run (written by :meth:`save`)."""
        self.data[key] = asdict(result)

    def save(self) -> None:
        """Write the cache atomically (no-op without a path), keeping the entries another
        process sharing the file saved meanwhile.

        The read-merge-write runs under an exclusive lock on a sidecar file
        (``.<name>.lock``, POSIX only), so two comparisons saving at the same moment both
        keep their runs."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self.data = {**self._read(), **self.data}
            # A temporary name of its own: comparisons run side by side must not write into one file.
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as handle:
                    handle.write(json.dumps(self.data))
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the cache's sidecar lock file (a no-op without ``fcntl``)."""
        if fcntl is None or self.path is None:
            yield
            return
        # Kept after use: unlinking a lock file races with a process about to lock it.
        with open(self.path.parent / f".{self.path.name}.lock", "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _hash_tensors(digest: Any, item: Any) -> None:
    """Feed the shapes, dtypes and values of the tensors in ``item`` (nested tuples/lists) to ``digest``."""
    if isinstance(item, torch.Tensor):
        t = item.detach().cpu()
        digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(item, (tuple, list)):
        for part in item:
            _hash_tensors(digest, part)
    else:
        digest.update(repr(item).encode())


FINGERPRINT_BATCHES = 4


def task_fingerprint(family: TaskFamily, seed: int) -> str:
    """A short hash of what ``family`` builds for ``seed``: the model's initial parameters and
    buffers, the first :data:`FINGERPRINT_BATCHES` minibatches, the whole training and held-out
    splits, the loss of the first minibatch (which changes with the loss function), the
    model's ``repr`` (module settings) and which parameters require gradients. Part
    of the baseline cache key, so that a changed task does not reuse cached runs."""
    instance = sample_instance(family, seed)
    digest = hashlib.sha1(str(instance.name).encode())
    # The modules' settings (a BatchNorm's momentum, a dropout rate) and which parameters
    # train: neither shows in the values or the first loss.
    digest.update(repr(instance.model).encode())
    for name, t in [*instance.model.named_parameters(), *instance.model.named_buffers()]:
        digest.update(f"{name}:{t.requires_grad}".encode())
        _hash_tensors(digest, t)
    batches = [instance.next_batch() for _ in range(FINGERPRINT_BATCHES)]
    _hash_tensors(digest, batches)
    for split in (instance.train_set, instance.test_set):
        _hash_tensors(digest, split if split is not None else "none")
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        _hash_tensors(digest, instance.loss(call_model(instance.model, batches[0][0]), batches[0][1]))
    return digest.hexdigest()[:16]


def _environment_key() -> str:
    """What else a run's numbers depend on: protocol, library and torch versions, threads."""
    from learned_optim import __version__

    versions = f"learned_optim{__version__}/torch{torch.__version__}"
    return f"protocol{PROTOCOL_VERSION}/{versions}/threads{torch.get_num_threads()}"


def check_grid(grid: float | Iterable[float]) -> list[float]:
    """``grid`` as a list of distinct learning rates, in order; a single number is a one-point grid.

    ValueError unless it is non-empty and every value is a finite number > 0 (checked before
    any run: an empty grid used to fail only after the learned rules had run, and a zero or NaN
    learning rate was "tuned" and reported as best).
    """
    if _is_number(grid):
        grid = [grid]
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Iterable):
        raise ValueError(f"grid must be a non-empty list of learning rates, got {type(grid).__name__} {grid!r}")
    values = list(grid)
    if not values:
        raise ValueError("grid must be a non-empty list of learning rates (finite numbers > 0), got an empty one")
    bad = [x for x in values if not (_is_number(x) and math.isfinite(x) and x > 0)]
    if bad:
        raise ValueError(f"grid: every learning rate must be a finite number > 0, got {bad}")
    # The values as given, not float(x): an int lr is part of existing cache keys as an int.
    return list(dict.fromkeys(values))


def _half_decade_step(lr: float, direction: int) -> float:
    """``lr`` times ``sqrt(10) ** direction``, to 9 significant digits: repeated widening of a
    half-decade grid lands on its exact points (10.0, 100.0) instead of drifting."""
    return float(f"{lr * 10 ** (direction / 2):.9g}")


def _aggregate(runs: Sequence[RunResult]) -> dict[str, Any]:
    def mean(xs: Sequence[float]) -> float:
        return float(sum(xs) / len(xs)) if all(math.isfinite(x) for x in xs) else float("inf")

    tests = [r.test_loss for r in runs]
    return {
        "mean_loss": mean([r.mean_loss for r in runs]),
        "final_loss": mean([r.final_loss for r in runs]),
        # NaN only for a task without a held-out split; a diverged seed makes it inf (it used
        # to be NaN too, which read as "no held-out split").
        "test_loss": float("nan") if any(math.isnan(x) for x in tests) else mean(tests),
        "seconds": sum(r.seconds for r in runs),
    }


def tune_baseline(
    name: str,
    factory: OptimizerFactory,
    family: TaskFamily,
    task_key: str,
    seeds: Sequence[int],
    steps: int,
    grid: Sequence[float] = DEFAULT_GRID,
    cache: ResultCache | None = None,
    on_run: Callable[[], None] | None = None,
    max_widen: int = 4,
    tune_test: bool = False,
    on_widen: Callable[[int], None] | None = None,
) -> OptimizerSummary:
    """Run ``factory`` over the lr grid (widened past edge optima) and keep the best lr per metric.

    The held-out loss is reported at the lr best on the final training loss, or, with
    ``tune_test``, at the lr best on the held-out loss itself (the most favourable choice).
    ``on_run`` is called after each run; ``on_widen`` with the number of runs a widening adds,
    before they start (e.g. to grow a progress bar's total).
    """
    grid = check_grid(grid)
    results: dict[float, list[RunResult]] = {}

    def evaluate(lr: float) -> None:
        runs = []
        for seed in seeds:
            key = ResultCache.key(task_key, name, repr(factory), lr, seed, steps, _environment_key())
            hit = cache.get(key) if cache is not None else None
            if hit is None:
                hit = run_once(family, seed, lambda p, lr=lr: factory(p, lr), steps)
                if cache is not None:
                    cache.put(key, hit)
            runs.append(hit)
            if on_run is not None:
                on_run()
        results[lr] = runs

    tuned = ("mean_loss", "final_loss", "test_loss") if tune_test else ("mean_loss", "final_loss")

    def edge_optima() -> set[float]:
        """The next grid point beyond each edge where a tuned metric is best."""
        lrs = sorted(results)
        edges = set()
        for metric in tuned:
            scores = {lr: _aggregate(results[lr])[metric] for lr in lrs}
            if metric == "test_loss" and not any(math.isfinite(v) for v in scores.values()):
                continue
            score = {lr: s if math.isfinite(s) else float("inf") for lr, s in scores.items()}
            best = min(score.values())
            # Beyond an edge only where that edge alone is best: a tie with an inner point (a
            # 1-step run's (a) is the same at every lr) says nothing lies beyond it. Where every
            # lr diverged, smaller ones are tried.
            winners = [lr for lr in lrs if score[lr] == best]
            if winners == [lrs[0]] or not math.isfinite(best):
                edges.add(_half_decade_step(lrs[0], -1))
            elif winners == [lrs[-1]]:
                edges.add(_half_decade_step(lrs[-1], +1))
        return edges

    for lr in grid:
        evaluate(lr)
    for _ in range(max_widen):
        edges = edge_optima()
        if not edges:
            break
        if on_widen is not None:
            on_widen(len(edges) * len(seeds))
        for lr in sorted(edges):
            evaluate(lr)
    scored = [_aggregate(runs) for runs in results.values()]
    if not any(math.isfinite(a["mean_loss"]) or math.isfinite(a["final_loss"]) for a in scored):
        # No best lr at all: "still at the edge ... may be better beyond it" misled here.
        warnings.warn(
            f"compare: {name} diverged at every learning rate tried ({min(results):g} .. {max(results):g}); "
            "it is reported as inf with no learning rate",
            RuntimeWarning,
            stacklevel=2,
        )
    elif max_widen and edge_optima():
        warnings.warn(
            f"compare: {name}'s best learning rate is still at the edge of the grid after widening it "
            f"{max_widen} times ({min(results):g} .. {max(results):g}); its tuned result may be better "
            "beyond it",
            RuntimeWarning,
            stacklevel=2,
        )

    lrs = sorted(results)
    table = {lr: _aggregate(results[lr]) for lr in lrs}
    best_lr: dict[str, float | None] = {}
    summary: dict[str, float] = {}
    for metric in METRICS:
        candidates = [lr for lr in lrs if math.isfinite(table[lr][metric])]
        if metric == "test_loss" and not tune_test:
            # Held-out loss is reported at the lr that is best on the final training loss.
            pick = best_lr["final_loss"]
        else:
            pick = min(candidates, key=lambda lr: table[lr][metric]) if candidates else None
            best_lr[metric] = pick
        if pick is not None:
            summary[metric] = table[pick][metric]
        else:  # no finite lr: NaN where every lr says NaN (no held-out split), else inf
            summary[metric] = float("nan") if all(math.isnan(table[lr][metric]) for lr in lrs) else float("inf")
    chosen = best_lr["final_loss"] if best_lr["final_loss"] is not None else lrs[0]
    return OptimizerSummary(
        name=name,
        best_lr=best_lr,
        mean_loss=summary["mean_loss"],
        final_loss=summary["final_loss"],
        test_loss=summary["test_loss"],
        curves=[r.losses for r in results[chosen]],
        seconds=table[chosen]["seconds"],
        per_seed={
            "mean_loss": [r.mean_loss for r in results[best_lr["mean_loss"] or chosen]],
            "final_loss": [r.final_loss for r in results[chosen]],
            "test_loss": [r.test_loss for r in results[best_lr.get("test_loss") or chosen]],
        },
        grid={f"{lr:g}": {k: v for k, v in table[lr].items()} for lr in lrs},
    )


def evaluate_rule(
    name: str,
    rule: Any,
    family: TaskFamily,
    seeds: Sequence[int],
    steps: int,
    lr: float = 1.0,
    on_run: Callable[[], None] | None = None,
) -> OptimizerSummary:
    """Run ``LearnedOptimizer(params, pretrained=rule, lr=lr)`` on every seed."""
    from learned_optim.optimizer import LearnedOptimizer

    runs = []
    for seed in seeds:
        runs.append(run_once(family, seed, lambda p: LearnedOptimizer(p, pretrained=rule, lr=lr), steps))
        if on_run is not None:
            on_run()
    agg = _aggregate(runs)
    return OptimizerSummary(
        name=name,
        best_lr={"mean_loss": lr, "final_loss": lr},
        mean_loss=agg["mean_loss"],
        final_loss=agg["final_loss"],
        test_loss=agg["test_loss"],
        curves=[r.losses for r in runs],
        seconds=agg["seconds"],
        per_seed={
            "mean_loss": [r.mean_loss for r in runs],
            "final_loss": [r.final_loss for r in runs],
            "test_loss": [r.test_loss for r in runs],
        },
    )


@dataclass
class Comparison:
    """Result of :func:`compare`: every optimizer's summary plus the settings."""

    task: str
    steps: int
    seeds: list[int]
    results: list[OptimizerSummary]
    baselines: list[str]
    tune_test: bool = False

    def result(self, name: str) -> OptimizerSummary:
        """The summary of the optimizer called ``name`` (ValueError naming the ones there are)."""
        for r in self.results:
            if r.name == name:
                return r
        raise ValueError(f"no optimizer {name!r} in this comparison; it has {[r.name for r in self.results]}")

    def best_baseline(self, metric: str) -> OptimizerSummary:
        """The baseline with the lowest value of ``metric`` (ValueError if there are none)."""
        _check_metric(metric)
        pool = [r for r in self.results if r.name in self.baselines]
        if not pool:
            raise ValueError("the comparison has no baselines")
        return min(pool, key=lambda r: getattr(r, metric))

    def ratio(self, name: str, metric: str) -> float:
        """``metric`` of ``name`` divided by the best baseline's (NaN without baselines, or when
        the best baseline's value is not finite and positive, e.g. every baseline diverged)."""
        mine = self.result(name)
        _check_metric(metric)
        if not any(r.name in self.baselines for r in self.results):
            return float("nan")
        best = getattr(self.best_baseline(metric), metric)
        # Not over inf: a finite loss would get the ratio 0, which reads as a perfect score.
        return getattr(mine, metric) / best if 0 < best < math.inf else float("nan")

    def wins(self, name: str, metric: str = "final_loss") -> int:
        """Seeds on which ``name`` beats every baseline (at their best lr) on ``metric``."""
        _check_metric(metric)
        mine = self.result(name).per_seed[metric]
        # Only the baselines count: other learned rules in the comparison are not opponents.
        others = [r.per_seed[metric] for r in self.results if r.name != name and r.name in self.baselines]
        return sum(1 for i, v in enumerate(mine) if all(v < o[i] for o in others))

    def table(self) -> str:
        """Markdown table, one row per optimizer.

        With :attr:`tune_test` an ``lr (held-out)`` column follows ``lr (b)``: the held-out loss
        is then not taken at ``lr (b)``.
        """
        columns = ["optimizer", "lr (a)", "lr (b)"]
        columns += ["lr (held-out)"] if self.tune_test else []
        columns += ["(a) mean loss", "ratio", "(b) final train loss", "ratio", "held-out loss", "seconds", "seeds won"]
        head = f"| {' | '.join(columns)} |\n|{'---|' * len(columns)}\n"
        rows = []
        for r in self.results:
            cells = [r.name, _fmt_lr(r.best_lr.get("mean_loss")), _fmt_lr(r.best_lr.get("final_loss"))]
            if self.tune_test:
                cells.append(_fmt_lr(held_out_lr(r)))
            cells += [
                format_loss(r.mean_loss),
                _fmt_ratio(self.ratio(r.name, "mean_loss")),
                format_loss(r.final_loss),
                _fmt_ratio(self.ratio(r.name, "final_loss")),
                format_loss(r.test_loss),
                f"{r.seconds:.1f}",
                f"{self.wins(r.name)}/{len(self.seeds)}",
            ]
            rows.append(f"| {' | '.join(cells)} |")
        return head + "\n".join(rows) + "\n"

    def to_json(self) -> dict[str, Any]:
        """Everything, JSON-serialisable."""
        return {
            "task": self.task,
            "steps": self.steps,
            "seeds": self.seeds,
            "baselines": self.baselines,
            "tune_test": self.tune_test,
            "results": [asdict(r) for r in self.results],
            "ratios": {r.name: {m: self.ratio(r.name, m) for m in ("mean_loss", "final_loss")} for r in self.results},
        }


def held_out_lr(summary: OptimizerSummary) -> float | None:
    """The learning rate ``summary``'s held-out loss was taken at: its best held-out lr when it was
    tuned on held-out loss (``tune_test``), else its ``lr (b)`` (None: no finite lr)."""
    return summary.best_lr.get("test_loss", summary.best_lr.get("final_loss"))


def plural(count: int, noun: str) -> str:
    """``"1 seed"``, ``"2 seeds"``: ``count`` and ``noun``, with an ``s`` unless ``count`` is 1."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def format_loss(value: float, decimals: int = 4) -> str:
    """``value`` with ``decimals`` decimals, or, below ``10 ** (2 - decimals)`` (0.01 for 4), to
    ``decimals`` significant digits: ``0.2376``, ``0.002213``, ``1.23e-05``, not ``0.0000``."""
    if value == 0 or not math.isfinite(value) or abs(value) >= 10 ** (2 - decimals):
        return f"{value:.{decimals}f}"
    return f"{value:.{decimals}g}"


def _fmt_lr(lr: float | None) -> str:
    return "-" if lr is None else f"{lr:g}"


def _fmt_ratio(ratio: float) -> str:
    if math.isnan(ratio):
        return "-"  # no ratio, shown like a missing lr
    if 0 < abs(ratio) < 0.1:
        return f"{ratio:.2g}"  # two significant digits: 0.0047 must not read as 0.00
    return f"{ratio:.2f}"


def one_or_many(value: Any) -> list[Any]:
    """``value`` as a list: a str (or any non-iterable, e.g. one rule object) is one item, not
    a sequence of characters."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return [value]
    return list(value)


def _seed_list(seeds: Any) -> list[int]:
    """``compare``'s ``seeds`` as a list of distinct ints: a count of the standard evaluation
    seeds, or the seeds themselves."""
    if isinstance(seeds, (str, bytes)):
        raise ValueError(f"seeds must be a positive number of seeds or a non-empty list, got {seeds!r}")
    if isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
        seed_list = list(range(EVALUATION_SEED_BASE, EVALUATION_SEED_BASE + int(seeds)))
    elif isinstance(seeds, Iterable):
        seed_list = list(seeds)
        # Not int(x): a seed of 1.5 used to run seed 1 and be reported as 1.5.
        bad = [x for x in seed_list if not isinstance(x, numbers.Integral) or isinstance(x, bool)]
        if bad:
            raise TypeError(f"seeds must be integers, got {bad}")
        seed_list = [int(x) for x in seed_list]
        repeated = sorted({x for x in seed_list if seed_list.count(x) > 1})
        if repeated:  # a repeated seed counts one instance twice in every mean
            raise ValueError(f"seeds must be distinct, got {repeated} more than once")
    else:
        raise TypeError(f"seeds must be a number of seeds or a list of integer seeds, got {type(seeds).__name__}")
    if not seed_list:
        raise ValueError(f"seeds must be a positive number of seeds or a non-empty list, got {seeds!r}")
    return seed_list


def _check_cache_path(cache_path: str | os.PathLike[str]) -> None:
    """ValueError unless ``cache_path`` can be a JSON file: not a folder, not below a file (else
    the error came after every run, when the cache was saved)."""
    if not isinstance(cache_path, (str, os.PathLike)):
        raise TypeError(f"cache_path must be a file path (str or os.PathLike), got {type(cache_path).__name__}")
    path = Path(cache_path)
    if path.is_dir():
        raise ValueError(f"cache_path {os.fspath(cache_path)!r} is a folder; give a JSON file's path in it")
    above = path.parent
    while not os.path.lexists(above) and above.parent != above:
        above = above.parent
    if not above.is_dir():
        raise ValueError(f"cache_path {os.fspath(cache_path)!r}: {above} is not a folder")


def compare(
    task: str | TaskFamily,
    rules: Any | Sequence[Any] = ("default",),
    steps: int = 100,
    seeds: int | Sequence[int] = 10,
    baselines: str | Sequence[str] = ("adam", "rmsprop", "sgd", "nesterov"),
    grid: float | Sequence[float] = DEFAULT_GRID,
    cache_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
    rule_names: str | Sequence[str] | None = None,
    tune_test: bool = False,
    task_label: str | None = None,
    rule_lrs: float | Sequence[float] = 1.0,
) -> Comparison:
    """Compare learned rules against tuned baselines on ``task``.

    Every argument is checked before anything runs (ValueError for a bad value, TypeError for
    a ``task`` or ``seeds`` of the wrong kind).

    Args:
        task: a built-in task name, or a :class:`~learned_optim.tasks.TaskFamily` (such as a
            :class:`~learned_optim.tasks.Task`).
        rules: rules to evaluate: ``"default"``, bundled names, directories, Hub repo ids
            or :class:`~learned_optim.rules.UpdateRule` objects; a single one (e.g. a str) is
            one rule. All are loaded before any run.
        steps: training steps per run.
        seeds: number of evaluation seeds (or the seeds themselves: distinct integers).
        baselines: names from :data:`BASELINES`; a single str is one name.
        grid: initial learning-rate grid for the baselines: finite numbers > 0 (a single
            number is a one-point grid).
        cache_path: JSON file caching baseline runs (not a folder).
        progress: show a progress bar.
        rule_names: labels for ``rules`` in the report, one per rule (a single str for one rule).
        tune_test: report baselines' held-out loss at the lr best on held-out loss.
        task_label: name of the task in reports and in the cache key (default: its name; the key
            also holds :func:`task_fingerprint`, so tasks that share a name never share entries).
        rule_lrs: the ``lr`` multiplier each rule runs at: one value for all, or one per rule
            (default 1, the working point rules are meta-trained at; learned rules are not
            tuned). A rule at another multiplier is labelled ``name@lr``.
    """
    from learned_optim.weights import DEFAULT_RULE, resolve_rule

    if not isinstance(task, (str, TaskFamily)):
        raise TypeError(f"task must be a task name (str), a Task or a TaskFamily, got {type(task).__name__}")
    baselines = one_or_many(baselines)
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; known: {sorted(BASELINES)}")
    repeated = sorted({b for b in baselines if baselines.count(b) > 1})
    if repeated:
        raise ValueError(f"baselines: {repeated} given more than once; name each baseline once")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    seed_list = _seed_list(seeds)
    if cache_path is not None:
        _check_cache_path(cache_path)
    grid = check_grid(grid)
    rules = one_or_many(rules)
    if isinstance(rule_lrs, (str, bytes)):  # not a list: its characters were converted one by one
        raise ValueError(f"rule_lrs must be a number or a list of numbers, got the str {rule_lrs!r}")
    try:
        lrs = [float(rule_lrs)] * len(rules) if _is_number(rule_lrs) else [float(x) for x in rule_lrs]
    except (TypeError, ValueError):
        raise ValueError(f"rule_lrs must be a number or a list of numbers, got {rule_lrs!r}") from None
    if len(lrs) != len(rules):
        raise ValueError(f"rule_lrs has {len(lrs)} values for {len(rules)} rules; give one value or one per rule")
    bad = [x for x in lrs if not (math.isfinite(x) and x > 0)]
    if bad:
        raise ValueError(f"rule_lrs must be positive finite numbers, got {bad}")
    if rule_names is not None:
        rule_names = one_or_many(rule_names)
        if len(rule_names) != len(rules):
            raise ValueError(f"rule_names has {len(rule_names)} names for {len(rules)} rules; give one per rule")
    family = get_task(task) if isinstance(task, str) else task
    task_key = task if isinstance(task, str) else getattr(family, "name", type(family).__name__)
    task_key = task_label or task_key
    loaded = []
    for item in rules:
        if isinstance(item, str) and item == "default":
            loaded.append(("default", resolve_rule(DEFAULT_RULE, is_default=True)))
        elif isinstance(item, (str, os.PathLike)):  # a bundled name, a folder or a Hub repo id
            loaded.append((os.fspath(item), resolve_rule(item)))
        else:
            loaded.append((type(item).__name__, resolve_rule(item)))
    if rule_names is not None:
        loaded = [(n, r) for n, (_, r) in zip(rule_names, loaded, strict=True)]
    else:
        loaded = [(n if lr == 1.0 else f"{n}@{lr:g}", r) for (n, r), lr in zip(loaded, lrs, strict=True)]
    # Results are looked up by name (ratios, wins, report): two rules of the same class,
    # or a rule named like a baseline, must not share one.
    taken = set(baselines)
    for i, (name, rule) in enumerate(loaded):
        unique, k = name, 2
        while unique in taken:
            unique, k = f"{name} ({k})", k + 1
        taken.add(unique)
        loaded[i] = (unique, rule)
    cache = ResultCache(cache_path)
    cache_task = f"{task_key}#{task_fingerprint(family, seed_list[0])}" if cache_path is not None else task_key
    total = len(seed_list) * (len(loaded) + len(baselines) * len(grid))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"compare {task_key}", unit="run", dynamic_ncols=True)
    tick = (lambda: bar.update(1)) if bar is not None else None

    def grow(runs: int) -> None:
        # The total counts the initial grid; a widened grid adds runs it did not know of.
        bar.total += runs
        bar.refresh()

    on_widen = grow if bar is not None else None
    results = []
    try:
        for (name, rule), lr in zip(loaded, lrs, strict=True):
            results.append(evaluate_rule(name, rule, family, seed_list, steps, lr=lr, on_run=tick))
        for b in baselines:
            results.append(
                tune_baseline(
                    b,
                    BASELINES[b],
                    family,
                    cache_task,
                    seed_list,
                    steps,
                    grid,
                    cache,
                    on_run=tick,
                    tune_test=tune_test,
                    on_widen=on_widen,
                )
            )
            cache.save()
    finally:
        if bar is not None:
            bar.close()
    return Comparison(
        task=task_key, steps=steps, seeds=seed_list, results=results, baselines=baselines, tune_test=tune_test
    )
