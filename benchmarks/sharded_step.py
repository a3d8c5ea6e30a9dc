"""Optimizer step time under FSDP2 (DTensor shards) against the same step in one process.

An MLP of about ``--size`` parameters (square layers) is stepped with the same gradients
twice, side by side in one run:

- in this process, unsharded, with ``--ranks`` torch threads;
- on ``--ranks`` CPU processes (gloo) with one thread each, every layer ``fully_shard``-ed,
  so each rank steps its shard and the rules' whole-tensor sums go through all-reduces.

For each rule and path (the fused C kernel and eager PyTorch) it prints the median
``optimizer.step()`` time of both, their ratio, and the all-reduces one sharded step makes;
AdamW (foreach) steps the same shards for reference. Same total cores on both sides, so a
ratio near 1 means sharding costs nothing beyond its collectives.

    python benchmarks/sharded_step.py --size 1M --ranks 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from _args import parameter_count, positive_int
from torch import nn

from learned_optim import LearnedOptimizer

PATHS = ("cpu", "eager")


def make_model(size: int) -> nn.Sequential:
    """Four square layers holding about ``size`` parameters, the same on every rank."""
    width = max(2, int((size / 4) ** 0.5))
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(4)))


def gradients(model: nn.Module, step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return [torch.randn(p.shape, generator=generator) * 1e-2 for p in model.parameters()]


def median_step_ms(
    optimizer: torch.optim.Optimizer, set_grads: Callable[[int], None], repeats: int, warmup: int = 2
) -> float:
    times = []
    for step in range(warmup + repeats):
        set_grads(step)
        start = time.perf_counter()
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def make_optimizer(params, rule: str, path: str) -> torch.optim.Optimizer:
    if rule == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, foreach=True)
    return LearnedOptimizer(params, pretrained=None if rule == "default" else rule, impl=path)


def runs(rules: list[str]) -> list[tuple[str, str]]:
    return [(rule, path) for rule in rules for path in PATHS] + [("adamw", "foreach")]


def one_process(size: int, rules: list[str], threads: int, repeats: int) -> dict[tuple[str, str], float]:
    torch.set_num_threads(threads)
    results = {}
    for rule, path in runs(rules):
        model = make_model(size)
        optimizer = make_optimizer(model.parameters(), rule, path)

        def set_grads(step: int, model: nn.Module = model) -> None:
            for p, g in zip(model.parameters(), gradients(model, step), strict=True):
                p.grad = g

        results[rule, path] = median_step_ms(optimizer, set_grads, repeats)
    return results


def _rank(rank: int, world_size: int, init_file: str, size: int, rules: list[str], repeats: int, out: str) -> None:
    """One rank: time every run on the sharded model; rank 0 writes the medians to ``out``."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        all_reduce, calls = dist.all_reduce, [0]

        def counted(*args, **kwargs):
            calls[0] += 1
            return all_reduce(*args, **kwargs)

        dist.all_reduce = counted
        lines = []
        for rule, path in runs(rules):
            model = make_model(size)
            for layer in model:
                fully_shard(layer)
            fully_shard(model)
            optimizer = make_optimizer(model.parameters(), rule, path)

            def set_grads(step: int, model: nn.Module = model) -> None:
                for p, g in zip(model.parameters(), gradients(model, step), strict=True):
                    p.grad = distribute_tensor(g, p.device_mesh, p.placements)

            dist.barrier()
            calls[0] = 0
            ms = median_step_ms(optimizer, set_grads, repeats)
            per_step = calls[0] / (repeats + 2)
            # The slowest rank sets the pace.
            slowest = torch.tensor([ms])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            lines.append(f"{rule}\t{path}\t{float(slowest):.6f}\t{per_step:g}\n")
        small = torch.zeros(32)
        times = []
        for _ in range(20):
            dist.barrier()
            start = time.perf_counter()
            all_reduce(small)
            times.append(time.perf_counter() - start)
        lines.append(f"all-reduce\t-\t{1000 * statistics.median(times):.6f}\t1\n")
        if rank == 0:
            with open(out, "w") as file:
                file.writelines(lines)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def sharded(size: int, rules: list[str], ranks: int, repeats: int) -> dict[tuple[str, str], tuple[float, float]]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "times.tsv")
        init_file = os.path.join(folder, "init")
        mp.spawn(_rank, args=(ranks, init_file, size, rules, repeats, out), nprocs=ranks, join=True)
        results = {}
        with open(out) as file:
            for line in file:
                rule, path, ms, calls = line.rstrip("\n").split("\t")
                results[rule, path] = (float(ms), float(calls))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parameter_count, default=parameter_count("1M"), help="parameters (1M, 10K)")
    parser.add_argument("--ranks", type=positive_int, default=2, help="processes, and threads of the one process")
    parser.add_argument("--rules", default="default,lstm-mnist-gain,hrnn-base", help="comma separated bundled rules")
    parser.add_argument("--repeats", type=positive_int, default=10, help="timed steps per run (after 2 warm-up)")
    args = parser.parse_args()
    if not torch.distributed.is_available():
        parser.error("needs torch.distributed")
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    single = one_process(args.size, rules, args.ranks, args.repeats)
    shards = sharded(args.size, rules, args.ranks, args.repeats)
    params = sum(p.numel() for p in make_model(args.size).parameters())
    print(f"{params:,} parameters; one process with {args.ranks} threads vs FSDP2 on {args.ranks} ranks x 1 thread")
    print(f"(median of {args.repeats} steps; torch {torch.__version__}, gloo)\n")
    print("| rule | path | one process (ms) | FSDP2 (ms) | FSDP2 / one process | all-reduces per step |")
    print("|---|---|---|---|---|---|")
    for rule, path in runs(rules):
        ms, calls = shards[rule, path]
        one = single[rule, path]
        print(f"| {rule} | {path} | {one:.2f} | {ms:.2f} | {ms / one:.2f} | {calls:g} |")
    print(f"\none all-reduce of 32 floats over {args.ranks} ranks: {shards['all-reduce', '-'][0]:.3f} ms")


if __name__ == "__main__":
    main()
