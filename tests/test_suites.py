"""The benchmark suites run end to end on a small number of seeds."""

from __future__ import annotations

import math

import pytest
import torch

from learned_optim import CoordinateLSTM
from learned_optim.suites import PAPER_SUITE, run_suite


def test_seed_xor_suite_reports_test_cross_entropy_per_optimizer():
    torch.manual_seed(0)
    result = run_suite("seed-xor", rules=[CoordinateLSTM(hidden_size=4)], seeds=2, progress=False, baselines=("adam",))
    (comparison,) = result.comparisons
    assert comparison.steps == 200 and len(comparison.seeds) == 2
    names = [r.name for r in comparison.results]
    assert names == ["CoordinateLSTM", "adam"]
    adam = comparison.results[1]
    # Held-out loss of the baseline is taken at its best held-out lr: no grid point is better.
    best_test = min(v["test_loss"] for v in adam.grid.values() if math.isfinite(v["test_loss"]))
    assert adam.test_loss == pytest.approx(best_test)
    text = result.markdown()
    assert "Test cross-entropy, mean ± std over datasets" in text
    assert "- adam: " in text
    try:
        import sklearn  # noqa: F401
    except ImportError:
        assert result.classical is None
    else:
        assert set(result.classical) == {
            "logistic regression L2 (CV)",
            "logistic regression L1 (CV)",
            "linear SVM",
            "RBF SVM",
        }
        assert all(mean > 0 and std >= 0 for mean, std in result.classical.values())


def test_paper_suite_covers_the_generalisation_settings_of_the_paper():
    assert ("mnist-mlp", 100) in PAPER_SUITE and ("mnist-mlp", 200) in PAPER_SUITE
    assert {task for task, _ in PAPER_SUITE} == {"mnist-mlp", "mnist-mlp-40", "mnist-mlp-2layer", "mnist-mlp-relu"}


def test_unknown_suite_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown suite 'nope'; known suites: paper, seed-xor"):
        run_suite("nope", rules=[CoordinateLSTM(hidden_size=4)])


@pytest.mark.parametrize("suite", ["paper", "seed-xor"])
def test_zero_seeds_is_an_error_not_the_default_count(suite):
    with pytest.raises(ValueError, match="seeds"):
        run_suite(suite, rules=[CoordinateLSTM(hidden_size=4)], seeds=0, progress=False)
