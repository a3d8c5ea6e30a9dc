"""Benchmark suites: fixed sets of (task, horizon) comparisons reported together.

- ``paper``: the generalisation experiments of Andrychowicz et al. 2016 on MNIST: the
  784-20-10 sigmoid MLP at 100 and 200 steps, and at 100 steps with 40 hidden units, two
  hidden layers, and ReLU.
- ``seed-xor``: the protocol of "Learning to Learn Neural Networks": many random XOR datasets
  of 200 samples with a train/test split that varies per dataset and lowered noise; each
  optimizer trains the 32-ReLU MLP on every dataset; reported is the mean and standard
  deviation of the test cross-entropy, with classical classifiers beside it when
  scikit-learn is installed.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from learned_optim.compare import (
    EVALUATION_SEED_BASE,
    Comparison,
    compare,
    format_loss,
    held_out_lr,
    one_or_many,
    plural,
)
from learned_optim.tasks.synthetic import XORFamily

PAPER_SUITE: tuple[tuple[str, int], ...] = (
    ("mnist-mlp", 100),
    ("mnist-mlp", 200),
    ("mnist-mlp-40", 100),
    ("mnist-mlp-2layer", 100),
    ("mnist-mlp-relu", 100),
)
SUITES = ("paper", "seed-xor")
# The seed paper lowers the input noise for this experiment; our default family uses 0.2.
SEED_XOR_NOISE_MEAN = 0.05
SEED_XOR_STEPS = 200


@dataclass
class SuiteResult:
    """Comparisons of one suite plus, for seed-xor, classical classifiers' test losses."""

    suite: str
    comparisons: list[Comparison]
    classical: dict[str, tuple[float, float]] | None = None

    def markdown(self) -> str:
        """One section per comparison (and the classical table if any)."""
        parts = [f"# Suite `{self.suite}`", ""]
        for c in self.comparisons:
            parts += [f"## {c.task}, {plural(c.steps, 'step')}, {plural(len(c.seeds), 'seed')}", ""]
            if c.tune_test:  # the held-out column is not at lr (b): say where it is from
                parts += [
                    "Baselines' held-out loss is taken at their learning rate best on held-out loss "
                    "(column `lr (held-out)`), not at `lr (b)`.",
                    "",
                ]
            parts.append(c.table())
            if self.suite == "seed-xor":
                parts += ["Test cross-entropy, mean ± std over datasets:", ""]
                for r in c.results:
                    xs = r.per_seed.get("test_loss", [])
                    if xs and all(math.isfinite(x) for x in xs):
                        mean, std = format_loss(statistics.fmean(xs), 3), format_loss(statistics.pstdev(xs), 3)
                        lr = held_out_lr(r)
                        at = f" (lr {lr:g})" if r.name in c.baselines and lr is not None else ""
                        parts.append(f"- {r.name}: {mean} ± {std}{at}")
                parts.append("")
        if self.classical:
            parts += ["Classical classifiers (scikit-learn), test cross-entropy:", ""]
            for name, (mean, std) in self.classical.items():
                parts.append(f"- {name}: {format_loss(mean, 3)} ± {format_loss(std, 3)}")
            parts.append("")
        return "\n".join(parts)

    def to_json(self) -> dict[str, Any]:
        """Everything, JSON-serialisable (non-finite numbers stay floats; the report writes them as strings)."""
        classical = None
        if self.classical is not None:
            classical = {name: {"mean": mean, "std": std} for name, (mean, std) in self.classical.items()}
        return {
            "suite": self.suite,
            "comparisons": [c.to_json() for c in self.comparisons],
            "classical": classical,
        }


def run_suite(
    suite: str,
    rules: Any | Sequence[Any] = ("default",),
    seeds: int | None = None,
    progress: bool = True,
    cache_dir: str | None = None,
    baselines: str | Sequence[str] = ("adam", "rmsprop", "sgd", "nesterov"),
) -> SuiteResult:
    """Run a named suite (``"paper"`` or ``"seed-xor"``).

    Args:
        suite: the suite name.
        rules: learned rules to evaluate (as for :func:`~learned_optim.compare.compare`; a single
            str is one rule).
        seeds: evaluation seeds per comparison (default 10 for ``paper``, 500 datasets for ``seed-xor``).
        progress: show progress bars.
        cache_dir: folder for the baseline-run caches.
        baselines: hand-designed optimizers to tune and compare against (a single str is one).

    :func:`~learned_optim.report.write_suite_report` writes the result as Markdown, JSON and plots.
    """
    # Once, here: the paper suite passes them to several comparisons (a generator would run dry).
    rules, baselines = one_or_many(rules), one_or_many(baselines)
    if suite == "paper":
        n = 10 if seeds is None else seeds
        comparisons = []
        for task, steps in PAPER_SUITE:
            cache = f"{cache_dir}/{task}.json" if cache_dir else None
            comparisons.append(compare(task, rules, steps, n, baselines, cache_path=cache, progress=progress))
        return SuiteResult(suite, comparisons)
    if suite == "seed-xor":
        n = 500 if seeds is None else seeds
        family = XORFamily(noise_mean=SEED_XOR_NOISE_MEAN, name="seed-xor")
        cache = f"{cache_dir}/seed-xor.json" if cache_dir else None
        comparison = compare(
            family,
            rules,
            SEED_XOR_STEPS,
            n,
            baselines,
            cache_path=cache,
            progress=progress,
            tune_test=True,
            task_label=f"seed-xor-noise{SEED_XOR_NOISE_MEAN}",
        )
        return SuiteResult(suite, [comparison], classical_baselines(n))
    raise ValueError(f"unknown suite {suite!r}; known suites: {', '.join(SUITES)}")


def classical_baselines(n: int) -> dict[str, tuple[float, float]] | None:
    """Test cross-entropy (mean, std) of scikit-learn classifiers on the seed-xor datasets.

    Logistic regression (L1 and L2, regularisation cross-validated), a linear SVM and an RBF
    SVM (probabilities by Platt scaling). ``None`` when scikit-learn is not installed.
    """
    try:
        from sklearn.linear_model import LogisticRegressionCV
        from sklearn.metrics import log_loss
        from sklearn.svm import SVC
    except ImportError:
        return None
    models = {
        "logistic regression L2 (CV)": lambda: LogisticRegressionCV(cv=3, max_iter=500, scoring="neg_log_loss"),
        "logistic regression L1 (CV)": lambda: LogisticRegressionCV(
            cv=3, penalty="l1", solver="liblinear", scoring="neg_log_loss"
        ),
        "linear SVM": lambda: SVC(kernel="linear", probability=True, random_state=0),
        "RBF SVM": lambda: SVC(kernel="rbf", probability=True, random_state=0),
    }
    family = XORFamily(noise_mean=SEED_XOR_NOISE_MEAN, name="seed-xor")
    scores: dict[str, list[float]] = {name: [] for name in models}
    for i in range(n):
        seed = EVALUATION_SEED_BASE + i
        dataset = family.dataset(seed)  # the same datasets the optimizers see
        (xtr, ytr), (xte, yte) = dataset.train, dataset.test
        for name, make in models.items():
            with warnings.catch_warnings():
                # scikit-learn's parameter deprecations vary by release; the models are the same.
                warnings.simplefilter("ignore", FutureWarning)
                model = make().fit(xtr.numpy(), ytr.numpy())
            proba = model.predict_proba(xte.numpy())
            scores[name].append(float(log_loss(yte.numpy(), proba, labels=[0.0, 1.0])))
    return {name: (statistics.fmean(v), statistics.pstdev(v)) for name, v in scores.items()}
