"""How learned rules cope with losses of other sizes than they were meta-trained on.

For each task and each loss factor, every instance's loss is multiplied by the factor
(``learned_optim.tasks.LossScaled``) and the rules run untuned (``lr`` 1) next to Adam at its
best learning rate for that factor (a half-decade grid, widened while the best is at an edge;
Adam is nearly scale-invariant, so it is the fair yardstick at every factor). Printed per
factor: each rule's (a) mean minibatch loss and (b) final whole-training-split loss as ratios
to tuned Adam's, and (b) itself divided by the factor (the unscaled loss). A rule that reads
the gradient's size as a cue shows ratios that grow away from the factors it was trained on.

    python benchmarks/loss_scale.py --rules default,hrnn-base --tasks mnist-mlp,mnist-conv --seeds 5
"""

from __future__ import annotations

import argparse
import math

import torch

from learned_optim.compare import compare
from learned_optim.tasks import LossScaled, get_task


def _floats(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v]
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise SystemExit(f"--scales must be positive numbers, comma separated, got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", default="default", help="comma separated: default, bundled names, folders")
    parser.add_argument("--tasks", default="mnist-mlp,mnist-conv", help="built-in task names, comma separated")
    parser.add_argument("--scales", default="0.0001,0.001,0.01,0.1,1,10,100", help="loss factors")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=5, help="evaluation seeds (from --seed-start)")
    parser.add_argument("--seed-start", type=int, default=800_000_000, help="never used in meta-training")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default=None, help="JSON file caching Adam's runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rules = [r for r in args.rules.split(",") if r]
    seeds = range(args.seed_start, args.seed_start + args.seeds)
    worst: dict[str, float] = dict.fromkeys(rules, 0.0)
    print(f"{args.steps} steps, {args.seeds} seeds from {args.seed_start}, {args.threads} thread(s)")
    print("ratios to Adam at its best lr for each factor and metric")
    for task in [t for t in args.tasks.split(",") if t]:
        print(f"\n### {task}\n")
        print("| loss factor | optimizer | (a) ratio | (b) ratio | (b) / factor | Adam lr (b) |")
        print("|---|---|---|---|---|---|")
        for scale in _floats(args.scales):
            family = LossScaled(get_task(task), scale, scale)
            result = compare(
                family, rules=rules, steps=args.steps, seeds=seeds, baselines=["adam"],
                cache_path=args.cache, progress=False, rule_names=rules,
            )  # fmt: skip
            adam = result.best_baseline("final_loss")
            adam_lr = adam.best_lr["final_loss"]
            rows = [*rules, "adam"]
            for name in rows:
                summary = result.result(name)
                ratio_a, ratio_b = result.ratio(name, "mean_loss"), result.ratio(name, "final_loss")
                if name in worst:
                    worst[name] = max(worst[name], ratio_b)
                print(
                    f"| {scale:g} | {name} | {ratio_a:.2f} | {ratio_b:.2f} | {summary.final_loss / scale:.4f} "
                    f"| {adam_lr:g} |",
                    flush=True,
                )
    print("\nworst (b) ratio over all tasks and factors: " + ", ".join(f"{n} {w:.2f}" for n, w in worst.items()))


if __name__ == "__main__":
    main()
