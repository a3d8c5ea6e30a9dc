"""What does knowing the horizon buy on an MNIST task? A reference, not a baseline.

The baselines of ``benchmarks/quality.py`` run at a constant learning rate, as the issue's
protocol asks. This script measures how much a hand-made schedule that knows the run's
length adds to the best of them: Nesterov SGD at a peak learning rate, held until step
``start`` and then decayed linearly to ``end`` x the peak at the last step. It searches a
small grid of (momentum, peak, start, end) on the first ``--search-seeds`` evaluation seeds,
then reports the best few schedules and the constant-lr reference (Nesterov 0.9 at
``--constant-lr``) on all ``--seeds`` evaluation seeds. The search uses evaluation seeds, so
the scheduled numbers are optimistic for the schedule: a bound to aim at, not a fair rival.

    python benchmarks/schedule_reference.py --task mnist-mlp --steps 100 --seeds 10
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Iterable

import torch

from learned_optim.compare import EVALUATION_SEED_BASE, run_once
from learned_optim.tasks import get_task


def late_decay(step: int, steps: int, start: int, end: float) -> float:
    """Multiplier of the peak lr before update ``step`` (0-based) of ``steps``: 1 until
    ``start``, then linear to ``end`` at the last update."""
    if step < start or steps - 1 <= start:
        return 1.0
    return 1.0 - (step - start) / (steps - 1 - start) * (1.0 - end)


class ScheduledNesterov(torch.optim.SGD):
    """Nesterov SGD whose lr follows :func:`late_decay` over a known number of steps."""

    def __init__(
        self, params: Iterable[torch.Tensor], peak: float, momentum: float, steps: int, start: int, end: float
    ) -> None:
        super().__init__(params, lr=peak, momentum=momentum, nesterov=True)
        self.peak, self.steps, self.start, self.end = peak, steps, start, end
        self.updates = 0

    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            group["lr"] = self.peak * late_decay(self.updates, self.steps, self.start, self.end)
        self.updates += 1
        return super().step(closure)


def score(task: str, seeds: list[int], steps: int, **schedule: float) -> tuple[float, float]:
    """Mean (a) mean minibatch loss and (b) final whole-split loss over ``seeds``."""
    family = get_task(task)
    runs = [run_once(family, s, lambda p: ScheduledNesterov(p, steps=steps, **schedule), steps) for s in seeds]
    return sum(r.mean_loss for r in runs) / len(runs), sum(r.final_loss for r in runs) / len(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="mnist-mlp")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--search-seeds", type=int, default=5)
    parser.add_argument("--constant-lr", type=float, default=1.0, help="the best grid lr of constant Nesterov")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    search = [EVALUATION_SEED_BASE + i for i in range(args.search_seeds)]
    every = [EVALUATION_SEED_BASE + i for i in range(args.seeds)]
    s = args.steps
    starts = sorted({s // 2, 3 * s // 5, 7 * s // 10})  # short runs would repeat a start
    grid = itertools.product((0.8, 0.9), (0.7, 1.0, 1.3, 1.6), starts, (0.0, 0.1, 0.3))
    found = []
    for momentum, peak, start, end in grid:
        p = args.constant_lr * peak
        _, final = score(args.task, search, s, peak=p, momentum=momentum, start=start, end=end)
        found.append((final, momentum, p, start, end))
    found.sort()
    const_a, const_b = score(args.task, every, s, peak=args.constant_lr, momentum=0.9, start=s, end=1.0)
    print(
        f"{args.task}, {s} steps, {args.seeds} evaluation seeds (schedules searched on the first {args.search_seeds})"
    )
    print("| Nesterov | momentum | peak lr | decay from step | to | (a) mean loss | (b) final loss | (b) / constant |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| constant lr | 0.9 | {args.constant_lr:g} | – | – | {const_a:.4f} | {const_b:.4f} | 1.000 |")
    for _, momentum, peak, start, end in found[:3]:
        a, b = score(args.task, every, s, peak=peak, momentum=momentum, start=start, end=end)
        print(f"| late decay | {momentum} | {peak:g} | {start} | {end:g}x | {a:.4f} | {b:.4f} | {b / const_b:.3f} |")
    print(f"({time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    main()
