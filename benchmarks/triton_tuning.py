"""Launch settings of the fused Triton LSTM kernel: time and accuracy of each variant (CUDA).

For every variant (coordinates per program, warps, ``tl.dot`` precision) this times the kernel
alone on ``--size`` coordinates of random state (median of ``triton.testing.do_bench``) and
checks it on fresh random inputs against the eager rule computed in float64
(``||out - ref|| / ||ref||`` for the update and the new state). The memory-traffic floor
(state read and written, gradient read, update written, over the measured copy bandwidth)
is printed beside each time.

    python benchmarks/triton_tuning.py --size 124M
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
import triton
import triton.testing

from learned_optim import CoordinateLSTM
from learned_optim.rules import lstm_triton
from learned_optim.rules.lstm_pack import pack_lstm_weights

VARIANTS = [
    # block, num_warps, tl.dot precision
    (64, 4, "tf32x3"),
    (128, 4, "tf32x3"),
    (128, 8, "tf32x3"),
    (32, 2, "tf32x3"),
    (64, 4, "tf32"),
    (64, 4, "ieee"),
]


def random_rule(config: dict) -> CoordinateLSTM:
    """A rule with weights of a trained rule's scale (the init is too close to zero to test)."""
    rule = CoordinateLSTM(**config)
    with torch.no_grad():
        for p in rule.parameters():
            p.copy_(torch.randn_like(p) * 0.4)
    return rule


def random_state(rule: CoordinateLSTM, n: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    state = {k: torch.empty_like(v) for k, v in rule.init_state(n, device, dtype).items()}
    for key, value in state.items():
        if key == "v":
            value.uniform_(1e-6, 1e-4)
        elif key == "h":
            value.uniform_(-1, 1)
        else:
            value.normal_(0, 1e-2 if key == "m" else 1.0)
    return state


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def check(rule: CoordinateLSTM, dtype: torch.dtype, precision: str, device: torch.device, n: int = 1 << 20) -> float:
    """Worst relative error over the update and the new state against float64 eager math."""
    state = random_state(rule, n, dtype, device)
    grad = torch.randn(n, device=device) * torch.exp(torch.randn(n, device=device) * 3) * 1e-3
    reference = copy.deepcopy(rule).double()
    ids = torch.zeros(n, dtype=torch.int64, device=device)
    ref_update, ref_state, _, _ = reference.full_step(grad.double(), {k: v.double() for k, v in state.items()}, ids, 1)
    update = torch.full((n,), float("nan"), device=device)  # every element must be written
    lstm_triton.lstm_step_triton(
        rule, pack_lstm_weights(rule), grad, state["h"], state["c"], update, precision=precision, m=state.get("m"),
        v=state.get("v"),
    )  # fmt: skip
    errors = [relative_error(update, ref_update)]
    errors += [relative_error(state[k], ref_state[k]) for k in state]
    return max(errors)


def time_kernel(rule, packed, grad, state, update, precision: str) -> float:
    """Median ms of one kernel launch over all ``grad.numel()`` coordinates."""

    def step() -> None:
        lstm_triton.lstm_step_triton(
            rule, packed, grad, state["h"], state["c"], update, precision=precision, m=state.get("m"), v=state.get("v")
        )

    return triton.testing.do_bench(step, warmup=200, rep=1500, return_mode="median")


def copy_bandwidth(device: torch.device) -> float:
    src = torch.randn(1 << 28, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=100, rep=500, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="124M")
    parser.add_argument("--configs", default='[{}, {"momentum_decays": [0.5, 0.9, 0.99]}]', help="JSON list")
    parser.add_argument("--variants", default="", help="indices into VARIANTS (default: all)")
    args = parser.parse_args()
    device = torch.device("cuda")
    n = int(float(args.size.rstrip("M")) * 1e6) if args.size.endswith("M") else int(args.size)
    bandwidth = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s, n = {n:,}")  # fmt: skip
    chosen = [VARIANTS[int(i)] for i in args.variants.split(",")] if args.variants else VARIANTS
    print("| rule | state | block | warps | precision | ms | x floor | max rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for config in json.loads(args.configs):
        torch.manual_seed(0)
        rule = random_rule(config).to(device)
        packed = pack_lstm_weights(rule)
        for dtype in (torch.float32, torch.bfloat16):
            state = random_state(rule, n, dtype, device)
            grad = torch.randn(n, device=device) * 1e-3
            update = torch.empty(n, device=device)
            state_bytes = rule.state_bytes_per_coordinate(dtype)
            floor_ms = n * (2 * state_bytes + 8) / bandwidth * 1e3
            for block, warps, precision in chosen:
                lstm_triton.LAUNCH.update(block=block, num_warps=warps)
                error = check(rule, dtype, precision, device)

                ms = time_kernel(rule, packed, grad, state, update, precision)
                name = "momenta" if config else "paper"
                tag = "bf16" if dtype == torch.bfloat16 else "fp32"
                cells = [name, tag, block, warps, precision, f"{ms:.2f}", f"{ms / floor_ms:.2f}", f"{error:.1e}"]
                print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
            del state, grad, update
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
