"""How low can metric (a) go on the 10-d quadratic family? A reference, not a baseline.

Runs conjugate gradient on the normal equations (CGNR) on the evaluation instances of
``--task quadratic``: with exact line searches it minimises ||Wθ − y||² over the Krylov
subspace at every step, which no first-order method restricted to that subspace can beat,
and it solves a 10-d problem exactly in 10 steps. It also prints the part of (a) fixed
before any update, the loss at step 0, which every optimizer shares. Same protocol as
``benchmarks/quality.py``: (a) is the mean of the losses recorded before each of the
``--steps`` updates, on the same evaluation seeds.

    python benchmarks/quadratic_bound.py --seeds 10
"""

from __future__ import annotations

import argparse

import torch
from _args import positive_int

from learned_optim.compare import EVALUATION_SEED_BASE
from learned_optim.tasks import get_task


def cgnr_losses(weights: torch.Tensor, target: torch.Tensor, theta: torch.Tensor, steps: int) -> list[float]:
    """Losses ||Wθ − y||² before each of ``steps`` CGNR iterations (float64)."""
    w, y, th = weights.double(), target.double(), theta.double().clone()
    residual = y - w @ th
    normal = w.T @ residual
    direction = normal.clone()
    losses = []
    for _ in range(steps):
        losses.append(float(residual @ residual))
        w_dir = w @ direction
        curvature = float(w_dir @ w_dir)
        if curvature <= 1e-300:  # solved: the residual of the normal equations vanished
            continue
        alpha = float(normal @ normal) / curvature
        th += alpha * direction
        residual -= alpha * w_dir
        new_normal = w.T @ residual
        beta = float(new_normal @ new_normal) / max(float(normal @ normal), 1e-300)
        direction = new_normal + beta * direction
        normal = new_normal
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=positive_int, default=10)
    parser.add_argument("--steps", type=positive_int, default=100)
    parser.add_argument("--dim", type=positive_int, default=10)
    args = parser.parse_args()
    family = get_task("quadratic")
    family.dim = args.dim
    mean_losses, first_losses = [], []
    for index in range(args.seeds):
        instance = family.sample(EVALUATION_SEED_BASE + index)
        weights, target = instance.train_set
        losses = cgnr_losses(weights, target, instance.model.theta.detach(), args.steps)
        mean_losses.append(sum(losses) / len(losses))
        first_losses.append(losses[0] / len(losses))
    print(f"quadratic (dim {args.dim}), {args.steps} steps, {args.seeds} evaluation seeds")
    print(f"(a) of conjugate gradient (CGNR, exact line search): {sum(mean_losses) / args.seeds:.4f}")
    print(f"share of (a) fixed by the step-0 loss alone:           {sum(first_losses) / args.seeds:.4f}")


if __name__ == "__main__":
    main()
