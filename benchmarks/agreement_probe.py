"""What a momentum LSTM rule's per-tensor inputs read during training runs.

For each task and ``lr`` multiplier, runs the rule for ``--steps`` steps on ``--seeds`` task
instances (``learned_optim.meta_fit.rollout``) and prints, per parameter tensor and over
windows of steps, the mean of two per-tensor cues for one momentum (``--momentum``: index into
``momentum_decays``): the cosine between the gradient and the momentum (``tensor_agreement``)
and ``log(||g|| / ||m||)`` (``tensor_norm_ratio``), then the step response
``(g_t . u) / (g_{t-1} . u)`` (``tensor_step_response``, unclipped), plus the mean minibatch
loss at a few steps.
The inputs are attached with zero weights (``init_from``), so the rule's updates are unchanged
and the probe shows what each cue would have told it. It asks whether a cue separates a step
size that is too large from a good one.

    python benchmarks/agreement_probe.py --rule lstm-mnist-momentum --tasks mnist-mlp,mnist-mlp-relu --lrs 0.5,1
"""

from __future__ import annotations

import argparse

import torch
from _args import positive_int
from torch import Tensor

from learned_optim import CoordinateLSTM
from learned_optim.meta_fit import rollout
from learned_optim.tasks import get_task

LOSS_STEPS = (0, 1, 2, 3, 5, 10, 20, 50, 70, 100)


class _RecordingLSTM(CoordinateLSTM):
    """Records each step's per-tensor sums (same math, fused kernels included)."""

    def tensor_inputs(self, sums: Tensor) -> Tensor:
        self.recorded.append(sums.detach().clone())
        return super().tensor_inputs(sums)


def probe_rule(name: str) -> _RecordingLSTM:
    """``name``'s weights in a recording rule with every kind of per-tensor input (the sums
    of all three cues are recorded whichever inputs the rule reads)."""
    source = CoordinateLSTM.from_pretrained(name)
    if not source.momentum_decays:
        raise SystemExit(f"{name} has no momentum inputs: the per-tensor cues compare the gradient with a momentum")
    # New inputs go after the rule's own (init_from keeps its inputs a prefix): a rule that reads
    # the norm ratios without the cosines keeps it that way; its sums still give the cosines.
    config = {**source.config, "tensor_norm_ratio": True, "tensor_step_response": True}
    if not source.needs_segments:
        config["tensor_agreement"] = True
    rule = _RecordingLSTM(**config)
    rule.init_from(source)
    rule.recorded = []
    return rule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rule", default="lstm-mnist-momentum", help="bundled name or folder of a momentum LSTM")
    parser.add_argument("--tasks", default="mnist-mlp,mnist-mlp-relu")
    parser.add_argument("--lrs", default="0.5,1", help="comma separated lr multipliers")
    parser.add_argument("--steps", type=positive_int, default=100, help="training steps per run (at least 2)")
    parser.add_argument("--seeds", type=positive_int, default=3)
    parser.add_argument("--seed-start", type=int, default=12345, help="task instance seeds")
    parser.add_argument("--momentum", type=int, default=0, help="which momentum's cosine (index)")
    parser.add_argument("--threads", type=positive_int, default=1)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps: the cues read a previous step, so at least 2 steps are needed")
    torch.set_num_threads(args.threads)
    rule = probe_rule(args.rule)
    # Step 0 has no momentum yet; windows past the run's end are dropped, the last one cut at it.
    windows = [(a, min(b, args.steps)) for a, b in ((1, 2), (2, 10), (10, 40), (40, args.steps)) if a < args.steps]
    shown = [s for s in LOSS_STEPS if s <= args.steps]
    print(f"rule {args.rule}, momentum decay {rule.momentum_decays[args.momentum]}, {args.seeds} seeds")
    k = len(rule.momentum_decays)
    cues = {
        "cosine": rule.agreement_cosines,
        "log norm ratio": rule.norm_ratios,
        # unclipped, to show how far a step overshot; one per tensor, repeated per momentum
        "step response": lambda sums: rule.step_response_ratios(sums).expand(-1, k),
    }
    rows = {cue: [] for cue in cues}
    curves = {}
    for task in args.tasks.split(","):
        family = get_task(task)
        for lr in (float(x) for x in args.lrs.split(",")):
            readings = {cue: [] for cue in cues}
            losses = []
            for seed in range(args.seed_start, args.seed_start + args.seeds):
                rule.recorded = []
                losses.append(rollout(rule, family.sample(seed), args.steps, lr=lr))
                sums = torch.stack(rule.recorded)  # (steps, tensors, 2k + 3)
                for cue, read in cues.items():
                    per_step = read(sums.reshape(-1, sums.shape[-1])).reshape(*sums.shape[:2], k)
                    readings[cue].append(per_step[:, :, args.momentum])  # (steps, tensors)
            for cue in cues:
                mean = torch.stack(readings[cue]).mean(0)
                cells = [" / ".join(f"{c:.2f}" for c in mean[a:b].mean(0).tolist()) for a, b in windows]
                rows[cue].append(f"| {task} | {lr:g} | " + " | ".join(cells) + " |")
            curves[(task, lr)] = [sum(run[s] for run in losses) / len(losses) for s in shown]
    for cue in cues:
        print(f"\n{cue}, per tensor")
        print("| task | lr | " + " | ".join(f"steps {a}-{b - 1}" for a, b in windows) + " |")
        print("|---|---|" + "---|" * len(windows))
        print("\n".join(rows[cue]))
    print()
    print("| task | lr | " + " | ".join(f"loss at {s}" for s in shown) + " |")
    print("|---|---|" + "---|" * len(shown))
    for (task, lr), curve in curves.items():
        print(f"| {task} | {lr:g} | " + " | ".join(f"{x:.2f}" for x in curve) + " |")


if __name__ == "__main__":
    main()
