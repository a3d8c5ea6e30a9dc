"""Drift of bf16 rule state against fp32 state over a long training run.

Trains the same MNIST MLP (same seed: same initialisation and minibatches) with
`LearnedOptimizer(state_dtype=torch.float32)` and with `state_dtype=torch.bfloat16`, and
prints the training loss of both along the way, the largest loss difference and the relative
distance between the final parameters. With ``--seeds N`` it repeats that for N evaluation
seeds and prints each seed's final losses and their means: the learned dynamics are chaotic
over 1,000 steps, so one seed's fp32/bf16 gap says little about the typical one.

    python benchmarks/state_dtype_drift.py --rule lstm-mnist --steps 1000 --seeds 10
"""

from __future__ import annotations

import argparse

import torch
from _args import positive_int

from learned_optim import LearnedOptimizer
from learned_optim.compare import EVALUATION_SEED_BASE
from learned_optim.tasks import call_model, get_task


def train(
    rule: str, task: str, steps: int, state_dtype: torch.dtype, seed: int = EVALUATION_SEED_BASE
) -> tuple[list[float], torch.Tensor, float]:
    instance = get_task(task).sample(seed)
    model = instance.model
    opt = LearnedOptimizer(model.parameters(), pretrained=rule, state_dtype=state_dtype)
    losses = []
    for _ in range(steps):
        x, y = instance.next_batch()
        opt.zero_grad()
        loss = instance.loss(call_model(model, x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = float(instance.loss(call_model(model, instance.train_set[0]), instance.train_set[1]))
    return losses, torch.cat([p.detach().reshape(-1) for p in model.parameters()]), final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rule", default="lstm-mnist")
    parser.add_argument("--task", default="mnist-mlp")
    parser.add_argument("--steps", type=positive_int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=positive_int, default=1, help="evaluation seeds (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"rule {args.rule}, task {args.task}, {args.steps} steps")
    rows = []
    for seed in range(EVALUATION_SEED_BASE, EVALUATION_SEED_BASE + args.seeds):
        l32, p32, f32 = train(args.rule, args.task, args.steps, torch.float32, seed)
        l16, p16, f16 = train(args.rule, args.task, args.steps, torch.bfloat16, seed)
        diff = max(abs(a - b) for a, b in zip(l32, l16, strict=True))
        rel = float((p32 - p16).norm() / p32.norm())
        rows.append((seed, f32, f16, diff, rel))
        if args.seeds == 1:
            print("| step | loss fp32 state | loss bf16 state |\n|---|---|---|")
            for t in sorted({0, 9, 99, 249, 499, 749, args.steps - 1}):
                if t < args.steps:
                    print(f"| {t + 1} | {l32[t]:.4f} | {l16[t]:.4f} |")
    if args.seeds > 1:
        print(
            "| seed | final loss fp32 state | bf16 state | ratio | largest minibatch-loss difference | "
            "relative parameter distance |\n|---|---|---|---|---|---|"
        )
        for seed, f32, f16, diff, rel in rows:
            print(f"| {seed} | {f32:.4f} | {f16:.4f} | {f16 / f32:.3f} | {diff:.4f} | {rel:.2e} |")
    f32 = sum(r[1] for r in rows) / len(rows)
    f16 = sum(r[2] for r in rows) / len(rows)
    diff, rel = max(r[3] for r in rows), sum(r[4] for r in rows) / len(rows)
    mean = "mean " if args.seeds > 1 else ""
    print(f"{mean}final whole-training-split loss: fp32 {f32:.4f}, bf16 {f16:.4f} (ratio {f16 / f32:.3f})")
    print(f"largest minibatch-loss difference {diff:.4f}; {mean}relative parameter distance {rel:.2e}")


if __name__ == "__main__":
    main()
