"""How far coordinates move while their gradient is exactly zero, next to Adam.

One tensor of ``--size`` coordinates gets ``--warmup`` steps of random gradients, then
``--zero-steps`` steps of all-zero gradients (a dense embedding's rows missing from the
batches, a layer whose gradients are zeroed). Prints, per optimizer, the largest and the mean
move over the zero-gradient steps, for each rule as shipped (``step_on_zero_grad=False``:
they hold still) and with ``step_on_zero_grad=True`` (the behaviour before session 50: the
rule's output for a zero gradient, a bias, is applied every step). Adam at lr 1e-3 and 1e-2
moves a bounded distance as its momentum decays.

    python benchmarks/zero_grad_drift.py --rules default,lstm-mnist-momentum,hrnn-base,lstm-mnist
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from _args import positive_int

from learned_optim import LearnedOptimizer
from learned_optim.weights import DEFAULT_RULE, resolve_rule


def moves(
    make_optimizer: Callable[[torch.nn.Parameter], torch.optim.Optimizer], size: int, warmup: int, zero_steps: int
):
    """(largest, mean) absolute move of the coordinates over the zero-gradient steps."""
    generator = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.zeros(size))
    optimizer = make_optimizer(param)
    for _ in range(warmup):
        param.grad = torch.randn(size, generator=generator)
        optimizer.step()
    start = param.detach().clone()
    for _ in range(zero_steps):
        param.grad = torch.zeros(size)
        optimizer.step()
    move = (param.detach() - start).abs()
    return float(move.max()), float(move.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", default="default,lstm-mnist-momentum,hrnn-base,lstm-mnist")
    parser.add_argument("--size", type=positive_int, default=1000)
    parser.add_argument("--warmup", type=positive_int, default=20)
    parser.add_argument("--zero-steps", type=positive_int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"{args.warmup} steps of N(0, 1) gradients, then {args.zero_steps} of zeros ({args.size} coordinates)")
    print("| optimizer | step_on_zero_grad | largest move | mean move |")
    print("|---|---|---|---|")
    for name in args.rules.split(","):
        shipped = resolve_rule(DEFAULT_RULE if name == "default" else name)
        for flag in (False, True):
            rule = type(shipped)(**{**shipped.config, "step_on_zero_grad": flag})
            rule.load_state_dict(shipped.state_dict())
            largest, mean = moves(
                lambda p, r=rule: LearnedOptimizer([p], pretrained=r), args.size, args.warmup, args.zero_steps
            )
            print(f"| {name} | {flag} | {largest:.4g} | {mean:.4g} |")
    for lr in (1e-3, 1e-2):
        largest, mean = moves(lambda p, lr=lr: torch.optim.Adam([p], lr=lr), args.size, args.warmup, args.zero_steps)
        print(f"| adam lr {lr:g} | - | {largest:.4g} | {mean:.4g} |")


if __name__ == "__main__":
    main()
