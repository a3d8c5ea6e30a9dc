"""Seconds per meta-iteration of `meta_fit`: instances in one rule call against one by one.

`meta_fit` steps all task instances of a meta-iteration with one call of the rule, each
instance keeping its own tensor-level and global state (`UpdateRule.full_step` with
`groups`). A rule whose forward reads its global state cannot be batched like that and gets
one call per instance; this script times both ways on the same settings, side by side in one
run (same seed, so the same instances and batches), and prints the ratio. That both compute
the same is tested (tests/test_hierarchical.py); over long unrolls at large learning-rate
multipliers their float rounding differences grow, so their meta-losses can differ in later
digits.

    python benchmarks/meta_fit_speed.py --task problem-set --instances 8
    python benchmarks/meta_fit_speed.py --task problem-set-wide --instances 2 --steps 300
"""

from __future__ import annotations

import argparse
import time

import torch

from learned_optim import HierarchicalRNN
from learned_optim.meta_fit import MetaFitConfig, MetaTrainer
from learned_optim.weights import load_rule


def time_meta_fit(args: argparse.Namespace, one_call: bool) -> float:
    rule = load_rule(args.init)
    if not isinstance(rule, HierarchicalRNN):
        raise SystemExit(f"--init {args.init!r} is a {type(rule).__name__}, not a HierarchicalRNN")
    if not one_call:
        # What meta_fit sees of a rule that reads its global state in forward: one call per instance.
        rule.forward_reads_global_state = True
    config = MetaFitConfig(
        steps=args.steps,
        unroll=args.steps,
        meta_iterations=args.iterations,
        instances=args.instances,
        meta_loss="log-ramp",
        log_floor=1e-2,
        lr_scale_range=10.0,
        grad_checkpoint_steps=100,
        validate_every=0,
        seed=args.seed,
    )
    trainer = MetaTrainer(rule, args.task, config, progress=False)
    start = time.perf_counter()
    trainer.run()
    return (time.perf_counter() - start) / args.iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default="hrnn-base", help="HierarchicalRNN weights to start from")
    parser.add_argument("--task", default="problem-set")
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100, help="unroll length (whole runs)")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="alternating timings of each way; the best counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        for one_call in (True, False):
            times[one_call].append(time_meta_fit(args, one_call))
    one_call_s, per_instance_s = min(times[True]), min(times[False])
    print(f"{args.task}, {args.instances} instances, {args.steps}-step unrolls, {args.threads} thread(s)")
    print(f"one rule call for all instances: {one_call_s:.2f} s per meta-iteration")
    print(f"one rule call per instance:      {per_instance_s:.2f} s per meta-iteration")
    print(f"speed-up: {per_instance_s / one_call_s:.2f}x")


if __name__ == "__main__":
    main()
