"""Trace a learned rule's own learning rates and the loss through one training run.

For rules that keep a per-coordinate log learning rate (``HierarchicalRNN``: state
``log_lr``), prints every ``--every`` steps the minibatch loss, the loss on the whole
training split and, per parameter tensor, the geometric mean of its coordinates' learning
rates (``exp`` of the mean log lr; the step is this times the unit-RMS direction times the
optimizer's ``lr``). It shows whether a rule adapts its step size to a problem or drifts.
Evaluation seeds as in ``benchmarks/quality.py`` (the first one by default).

    python benchmarks/lr_trace.py --rule hrnn-base --task mnist-mlp --steps 1000
"""

from __future__ import annotations

import argparse

import torch
from _args import positive_int

from learned_optim import LearnedOptimizer
from learned_optim.compare import EVALUATION_SEED_BASE
from learned_optim.tasks import get_task
from learned_optim.tasks.base import call_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rule", default="hrnn-base", help="bundled name, folder or Hub id")
    parser.add_argument("--task", default="mnist-mlp")
    parser.add_argument("--steps", type=positive_int, default=1000)
    parser.add_argument("--every", type=positive_int, default=100)
    parser.add_argument("--seed", type=int, default=EVALUATION_SEED_BASE)
    parser.add_argument("--lr", type=float, default=1.0, help="the optimizer's lr multiplier")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    instance = get_task(args.task).sample(args.seed)
    model = instance.model
    opt = LearnedOptimizer(model.parameters(), args.rule, lr=args.lr)
    if "log_lr" not in opt.rule.state_spec():
        parser.error(f"{args.rule!r} is a {type(opt.rule).__name__}, which keeps no per-coordinate learning rate")
    names = [name for name, _ in model.named_parameters()]
    print(f"{args.rule} on {instance.name}, seed {args.seed}, lr x{args.lr}")
    print("step | batch loss | train-split loss | learning rate per tensor (" + ", ".join(names) + ")")
    train_x, train_y = instance.train_set
    for step in range(args.steps):
        inputs, targets = instance.next_batch()
        loss = instance.loss(call_model(model, inputs), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.every == 0 or step == args.steps - 1:
            with torch.no_grad():
                full = instance.loss(call_model(model, train_x), train_y).item()
            rates = [opt.state[p]["rule.log_lr"].float().mean().exp().item() for p in model.parameters()]
            print(f"{step} | {loss.item():.4f} | {full:.4f} | " + " ".join(f"{r:.2e}" for r in rates))


if __name__ == "__main__":
    main()
