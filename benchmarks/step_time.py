"""Optimizer step time: learned rules (flat chunked path and a naive per-tensor loop) vs AdamW.

For each model size, every optimizer steps the same parameters with the same gradients;
times are medians over repeated steps, measured side by side in one run. Also prints the
rule state bytes per parameter and the peak temporary memory of a step (CPU: tracemalloc
cannot see torch allocations, so the chunked path's bound is reported analytically as
chunk_size x per-coordinate temporaries; on CUDA the allocator's peak is measured).

    python benchmarks/step_time.py --sizes 1M,10M --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from learned_optim import CoordinateLSTM, HierarchicalRNN, LearnedOptimizer
from learned_optim.rules.base import UpdateRule


def make_params(total: int, device: torch.device, tensors: int = 8) -> list[nn.Parameter]:
    """``tensors`` weight matrices plus biases holding about ``total`` parameters."""
    width = int((total / tensors) ** 0.5)
    params = []
    for _ in range(tensors):
        params.append(nn.Parameter(torch.randn(width, width, device=device) * 0.02))
        params.append(nn.Parameter(torch.zeros(width, device=device)))
    return params


class NaivePerTensor(torch.optim.Optimizer):
    """A typical port: one rule call per parameter tensor, state per tensor, no chunking."""

    def __init__(self, params, rule: UpdateRule) -> None:
        super().__init__(params, {})
        self.rule = rule

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update(self.rule.init_state(p.numel(), p.device))
                ids = torch.zeros(p.numel(), dtype=torch.int64, device=p.device)
                update, new_state, _, _ = self.rule.full_step(p.grad.reshape(-1), dict(state), ids, 1)
                state.update(new_state)
                p.add_(update.view_as(p))


def time_steps(make: Callable[[list[nn.Parameter]], torch.optim.Optimizer], params, repeats: int) -> float:
    opt = make(params)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()  # state allocation happens outside the timing
    sync = torch.cuda.synchronize if params[0].is_cuda else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        opt.step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1M,10M", help="comma separated parameter counts (K/M suffixes)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-naive-above", default="20M", help="skip the slow naive loop above this size")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    def parse(s: str) -> int:
        return int(float(s[:-1]) * {"K": 1e3, "M": 1e6}[s[-1]]) if s[-1] in "KM" else int(s)

    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    lstm, hrnn = CoordinateLSTM().to(device), HierarchicalRNN().to(device)
    print(
        f"state bytes/param: LSTM {lstm.state_bytes_per_coordinate()} (fp32), "
        f"{lstm.state_bytes_per_coordinate(torch.bfloat16)} (bf16); HRNN {hrnn.state_bytes_per_coordinate()}; "
        "AdamW 8"
    )
    print("| params | optimizer | ms/step | vs AdamW (foreach) | vs naive loop |")
    print("|---|---|---|---|---|")
    for size in args.sizes.split(","):
        n = parse(size)
        params = make_params(n, device)
        total = sum(p.numel() for p in params)
        results: dict[str, float] = {}
        results["AdamW foreach"] = time_steps(lambda ps: torch.optim.AdamW(ps, foreach=True), params, args.repeats)
        if device.type == "cuda":
            results["AdamW fused"] = time_steps(lambda ps: torch.optim.AdamW(ps, fused=True), params, args.repeats)
        for name, rule in (("LSTM", lstm), ("HRNN", hrnn)):
            results[f"{name} chunked"] = time_steps(
                lambda ps, r=rule: LearnedOptimizer(ps, pretrained=r), params, args.repeats
            )
            results[f"{name} chunked, bf16 state"] = time_steps(
                lambda ps, r=rule: LearnedOptimizer(ps, pretrained=r, state_dtype=torch.bfloat16), params, args.repeats
            )
            if n <= parse(args.skip_naive_above):
                results[f"{name} naive per-tensor"] = time_steps(
                    lambda ps, r=rule: NaivePerTensor(ps, r), params, max(2, args.repeats // 2)
                )
        adam = results["AdamW foreach"]
        for name, ms in results.items():
            rule_name = name.split()[0]
            naive = results.get(f"{rule_name} naive per-tensor")
            vs_naive = f"{naive / ms:.1f}x faster" if naive and "naive" not in name else "-"
            print(f"| {total / 1e6:.1f}M | {name} | {ms:.1f} | {ms / adam:.0f}x | {vs_naive} |", flush=True)


if __name__ == "__main__":
    main()
