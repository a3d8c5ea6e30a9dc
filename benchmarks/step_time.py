"""Optimizer step time: learned rules on every path vs AdamW, naive loops and the memory floor.

For each model size, every optimizer steps the same parameters with the same gradients;
times are medians over repeated steps, measured side by side in one run. Paths:

- ``eager``: the rule's PyTorch ``forward`` over chunks of all tensors (``impl="eager"``);
- ``fused``: the rule's fused kernel for the device (C on CPU, Triton on CUDA);
- ``naive loop``: the rule's own ``forward`` called once per parameter tensor;
- ``typical port``: what PyTorch ports of the paper do: per tensor, log/sign preprocessing,
  two ``nn.LSTMCell`` and a ``nn.Linear`` (same weights as the rule).

Also printed: state bytes per parameter; the LSTM's memory-traffic floor (state, gradient
and parameter bytes read and written per step, divided by the measured copy bandwidth of
the device) and the fused path's distance to it; peak temporary memory (measured by the
CUDA allocator on GPU; on CPU the fused path's temporaries are its flat gradient and
update chunks, from its chunk plan).

    python benchmarks/step_time.py --sizes 1M,10M --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from _args import parameter_count, parameter_counts, positive_int
from torch import nn

from learned_optim import CoordinateLSTM, HierarchicalRNN, LearnedOptimizer
from learned_optim.functional import FUSED_CHUNK_SIZE
from learned_optim.rules.base import UpdateRule
from learned_optim.rules.preprocess import log_sign_preprocess


def make_params(total: int, device: torch.device, tensors: int = 8) -> list[nn.Parameter]:
    """``tensors`` weight matrices plus biases holding about ``total`` parameters."""
    width = int((total / tensors) ** 0.5)
    params = []
    for _ in range(tensors):
        params.append(nn.Parameter(torch.randn(width, width, device=device) * 0.02))
        params.append(nn.Parameter(torch.zeros(width, device=device)))
    return params


class NaivePerTensor(torch.optim.Optimizer):
    """One call of the rule's own ``forward`` per parameter tensor, state per tensor."""

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


class TypicalPort(torch.optim.Optimizer):
    """The usual PyTorch port of Andrychowicz et al.: ``nn.LSTMCell`` layers run per tensor."""

    def __init__(self, params, rule: CoordinateLSTM) -> None:
        super().__init__(params, {})
        hidden = rule.hidden_size
        self.cells = []
        for layer in range(rule.num_layers):
            fan_in = 2 if layer == 0 else hidden
            cell = nn.LSTMCell(fan_in, hidden).to(rule.output.weight.device)
            # The rule's gates are (i, f, o, g); LSTMCell's are (i, f, g, o).
            order = torch.cat([torch.arange(0, 2 * hidden), torch.arange(3 * hidden, 4 * hidden),
                               torch.arange(2 * hidden, 3 * hidden)])  # fmt: skip
            with torch.no_grad():
                weight = rule.weights[layer][order]
                cell.weight_ih.copy_(weight[:, :fan_in])
                cell.weight_hh.copy_(weight[:, fan_in:])
                cell.bias_ih.copy_(rule.biases[layer][order])
                cell.bias_hh.zero_()
            self.cells.append(cell)
        self.readout = rule.output
        self.scale = rule.output_scale

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    zeros = p.new_zeros(p.numel(), self.cells[0].hidden_size)
                    state["hc"] = [(zeros.clone(), zeros.clone()) for _ in self.cells]
                x = log_sign_preprocess(p.grad.reshape(-1))
                new = []
                for cell, hc in zip(self.cells, state["hc"], strict=True):
                    h, c = cell(x, hc)
                    new.append((h, c))
                    x = h
                state["hc"] = new
                p.add_((self.readout(x).squeeze(-1) * self.scale).view_as(p))


def time_steps(make: Callable[[list[nn.Parameter]], torch.optim.Optimizer], params, repeats: int) -> tuple[float, int]:
    """Median ms per step, and the peak temporary bytes of a step (CUDA only, else 0)."""
    opt = make(params)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()  # state allocation happens outside the timing
    cuda = params[0].is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    peak = 0
    for _ in range(repeats):
        sync()
        if cuda:
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        opt.step()
        sync()
        times.append(time.perf_counter() - start)
        if cuda:
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
    del opt
    return statistics.median(times) * 1e3, peak


def fused_temporary_bytes(params: list[nn.Parameter], chunk_size: int = FUSED_CHUNK_SIZE) -> int:
    """Peak temporaries of the fused path's step for fp32 gradients: per chunk, either a flat fp32
    gradient copy that is reused as the update (a chunk spanning several tensors) or an update
    buffer beside ``.grad`` read in place (a chunk inside one tensor): 4 bytes per coordinate."""
    return 4 * min(sum(p.numel() for p in params), chunk_size)


def copy_bandwidth(device: torch.device, megabytes: int = 512) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    src = torch.empty(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dst.copy_(src)
    sync()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / min(times)


def _speedup(reference_ms: float, ms: float) -> str:
    """``reference_ms`` against ``ms`` in words: "0.9x faster" used to stand for a slowdown."""
    ratio = reference_ms / ms
    return f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"


def _count(total: int) -> str:
    """A parameter count as in ``--sizes`` (10K, 1M): small sizes used to print as "0.0M"."""
    return f"{total / 1e6:.1f}M" if total >= 100_000 else f"{total / 1e3:.0f}K"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes", type=parameter_counts, default="1M,10M", help="comma separated parameter counts (K/M suffixes)"
    )
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--skip-naive-above", type=parameter_count, default="20M", help="skip the slow naive loops above this size"
    )
    parser.add_argument("--no-hrnn", action="store_true", help="time the LSTM rule only")
    parser.add_argument(
        "--lstm-config",
        default="{}",
        help="CoordinateLSTM config as JSON, e.g. '{\"momentum_decays\": [0.5, 0.9, 0.99]}' (default: the paper's)",
    )
    parser.add_argument(
        "--triton-launch",
        default="{}",
        help="override the Triton LSTM kernel's launch settings (lstm_triton.LAUNCH), e.g. '{\"block\": 128}'",
    )
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch build sees no CUDA device")
    try:
        lstm_config = json.loads(args.lstm_config)
        CoordinateLSTM(**lstm_config)
    except (ValueError, TypeError) as err:
        parser.error(f"--lstm-config: {err}")
    if args.triton_launch != "{}":
        from learned_optim.rules import lstm_triton

        if not args.device.startswith("cuda"):
            parser.error(
                f"--triton-launch: tunes the Triton kernel timed on CUDA; --device {args.device} times the C kernel"
            )
        try:
            launch = json.loads(args.triton_launch)
        except ValueError as err:
            parser.error(f"--triton-launch: {err}")
        unknown = sorted(set(launch) - set(lstm_triton.LAUNCH)) if isinstance(launch, dict) else None
        if unknown is None or unknown:
            parser.error(f"--triton-launch: expected a JSON object with keys from {sorted(lstm_triton.LAUNCH)}")
        lstm_triton.LAUNCH.update(launch)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    lstm, hrnn = CoordinateLSTM(**lstm_config).to(device), HierarchicalRNN().to(device)
    fused = "triton" if device.type == "cuda" else "cpu"
    if fused not in lstm.fused_impls():
        raise SystemExit(f"the LSTM rule has no {fused!r} kernel here (fused kernels: {lstm.fused_impls()})")
    bandwidth = copy_bandwidth(device)
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, copy bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    lstm_bytes = {dtype: lstm.state_bytes_per_coordinate(dtype) for dtype in (torch.float32, torch.bfloat16)}
    print(
        f"state bytes/param: LSTM {lstm_bytes[torch.float32]} (fp32), {lstm_bytes[torch.bfloat16]} (bf16); "
        f"HRNN {hrnn.state_bytes_per_coordinate()}; AdamW 8"
    )
    print("| params | optimizer | ms/step | vs AdamW | vs naive loop | vs typical port | x floor | peak temp / state |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        params = make_params(n, device)
        total = sum(p.numel() for p in params)
        rows: dict[str, tuple[float, int]] = {}
        rows["AdamW foreach"] = time_steps(lambda ps: torch.optim.AdamW(ps, foreach=True), params, args.repeats)
        if device.type == "cuda":
            rows["AdamW fused"] = time_steps(lambda ps: torch.optim.AdamW(ps, fused=True), params, args.repeats)
        floors = {}
        for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            for impl in (fused, "eager"):
                rows[f"LSTM {impl}, {tag} state"] = time_steps(
                    lambda ps, i=impl, d=dtype: LearnedOptimizer(ps, pretrained=lstm, impl=i, state_dtype=d),
                    params,
                    args.repeats,
                )
            # Read and write the state; read the gradient; read and write the parameter.
            floors[tag] = total * (2 * lstm_bytes[dtype] + 4 + 8) / bandwidth * 1e3
        small = n <= args.skip_naive_above
        if small:
            few = max(2, args.repeats // 2)
            rows["LSTM naive loop"] = time_steps(lambda ps: NaivePerTensor(ps, lstm), params, few)
            if not lstm.momentum_decays and lstm.preprocess:  # the ports have the paper's inputs only
                rows["LSTM typical port"] = time_steps(lambda ps: TypicalPort(ps, lstm), params, few)
        if not args.no_hrnn:
            hrnn_impls = [i for i in (fused, "eager") if i == "eager" or i in hrnn.fused_impls()]
            for impl in hrnn_impls:
                for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
                    if impl == "eager" and dtype == torch.bfloat16:
                        continue
                    rows[f"HRNN {impl}, {tag} state"] = time_steps(
                        lambda ps, i=impl, d=dtype: LearnedOptimizer(ps, pretrained=hrnn, impl=i, state_dtype=d),
                        params,
                        args.repeats,
                    )
            if small:
                rows["HRNN naive loop"] = time_steps(lambda ps: NaivePerTensor(ps, hrnn), params, few)
        adam = rows["AdamW foreach"][0]
        for name, (ms, peak) in rows.items():
            rule_name = name.split()[0]
            naive = rows.get(f"{rule_name} naive loop", (0.0, 0))[0]
            port = rows.get(f"{rule_name} typical port", (0.0, 0))[0]
            is_baseline = "naive" in name or "typical" in name or rule_name == "AdamW"
            vs_naive = _speedup(naive, ms) if naive and not is_baseline else "-"
            vs_port = _speedup(port, ms) if port and not is_baseline else "-"
            floor = "-"
            temp = "-"
            if rule_name == "LSTM" and "state" in name:
                tag = "bf16" if "bf16" in name else "fp32"
                floor = f"{ms / floors[tag]:.2f}"
                state_bytes = total * lstm_bytes[torch.bfloat16 if tag == "bf16" else torch.float32]
                if name.startswith(f"LSTM {fused}"):
                    measured = peak if device.type == "cuda" else fused_temporary_bytes(params)
                    temp = f"{100 * measured / state_bytes:.1f}%"
                elif device.type == "cuda":
                    temp = f"{100 * peak / state_bytes:.1f}%"
            cells = [_count(total), name, f"{ms:.1f}", f"{ms / adam:.0f}x", vs_naive, vs_port, floor, temp]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
