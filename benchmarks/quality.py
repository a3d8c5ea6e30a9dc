"""Quality of learned rules against tuned baselines on a set of (task, horizon) problems.

Each problem is a `learned_optim.compare.compare` run: Adam, RMSprop, SGD and Nesterov SGD at
their best half-decade grid learning rate per metric, on evaluation seeds never used in
meta-training; every seed fixes initialisation and minibatch order for every optimizer.
Prints, per rule and problem, (a) mean training minibatch loss over the run and (b) the
whole-training-split loss after the last step, as ratios to the best baseline, plus the
lr-robustness sweep.

    python benchmarks/quality.py --rules lstm-mnist --problems mnist --seeds 10
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _args import positive_int, task_steps

from learned_optim.compare import (
    BASELINES,
    EVALUATION_SEED_BASE,
    ResultCache,
    compare,
    evaluate_rule,
    run_once,
    task_fingerprint,
    tune_baseline,
)
from learned_optim.tasks import get_task
from learned_optim.weights import DEFAULT_RULE, resolve_rule

PROBLEMS = {
    # Issue 3: MNIST and its generalisation settings (Andrychowicz et al. 2016, section 3.2).
    "mnist": [
        ("mnist-mlp", 100),
        ("mnist-mlp", 200),
        ("mnist-mlp-40", 100),
        ("mnist-mlp-2layer", 100),
        ("mnist-mlp-relu", 100),
    ],
    "quadratic": [("quadratic", 100)],
    # Issue 4: tasks outside the hierarchical RNN's meta-training set.
    "general": [
        ("mnist-mlp", 200),
        ("mnist-mlp-relu", 200),
        ("mnist-conv", 200),
        ("xor", 200),
        ("teacher", 200),
        ("mnist-mlp", 1000),
    ],
    # An architecture unlike every MLP/convnet task: a small transformer reversing sequences.
    "transformer": [("transformer-reverse", 300)],
}


MULTIPLIERS = (0.1, 0.3, 1.0, 3.0, 10.0)


def lr_sweep(
    rule_name: str, task: str, steps: int, seeds: list[int], cache: Path | None = None
) -> dict[str, dict[float, float]]:
    """Final training loss of the rule at lr multipliers 0.1..10 of its working point (1), and of
    Adam over the same 100x range twice: around its default lr 1e-3 (what untuned users run)
    and around its tuned lr for this task (the like-for-like comparison)."""
    family = get_task(task)
    rule = resolve_rule(DEFAULT_RULE if rule_name == "default" else rule_name)
    baseline_cache = ResultCache(cache / f"{task}.json" if cache else None)
    tuned = tune_baseline(
        "adam", BASELINES["adam"], family, f"{task}#{task_fingerprint(family, seeds[0])}", seeds, steps,
        cache=baseline_cache,
    ).best_lr["final_loss"]  # fmt: skip
    baseline_cache.save()
    out: dict[str, dict[float, float]] = {rule_name: {}, "adam around 1e-3": {}, f"adam around its tuned {tuned:g}": {}}
    for mult in MULTIPLIERS:
        out[rule_name][mult] = evaluate_rule(rule_name, rule, family, seeds, steps, lr=mult).final_loss
    for center, name in ((1e-3, "adam around 1e-3"), (tuned, f"adam around its tuned {tuned:g}")):
        for mult in MULTIPLIERS:
            lr = center * mult
            runs = [run_once(family, s, lambda p, lr=lr: BASELINES["adam"](p, lr), steps) for s in seeds]
            out[name][float(f"{lr:.6g}")] = sum(r.final_loss for r in runs) / len(runs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", required=True, help="comma separated rules (bundled names, dirs, Hub ids)")
    parser.add_argument("--problems", default="mnist", help=f"comma separated sets: {', '.join(PROBLEMS)}")
    parser.add_argument("--seeds", type=positive_int, default=10)
    parser.add_argument(
        "--seed-start",
        type=int,
        default=EVALUATION_SEED_BASE,
        help="first evaluation seed (default: the standard evaluation seeds; another start gives "
        "fresh test seeds that were never used to choose between rules)",
    )
    parser.add_argument("--out", default="results/quality")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default="results/.cache", help="folder caching baseline runs")
    parser.add_argument(
        "--lr-sweep", type=task_steps, default=None, help="task:steps for the lr-robustness sweep, e.g. mnist-mlp:100"
    )
    args = parser.parse_args()
    unknown = [p for p in args.problems.split(",") if p not in PROBLEMS]
    if unknown:
        parser.error(f"--problems: unknown set(s) {unknown}; known: {', '.join(PROBLEMS)}")
    if args.lr_sweep:
        try:
            get_task(args.lr_sweep[0])  # a typo is a usage error now, not after every problem ran
        except ValueError as error:
            parser.error(f"--lr-sweep: {error}")
    torch.set_num_threads(args.threads)
    rules = args.rules.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    start = time.perf_counter()
    for problem_set in args.problems.split(","):
        for task, steps in PROBLEMS[problem_set]:
            seeds = list(range(args.seed_start, args.seed_start + args.seeds))
            c = compare(task, rules, steps, seeds, cache_path=Path(args.cache) / f"{task}.json", progress=False)
            best_a, best_b = c.best_baseline("mean_loss"), c.best_baseline("final_loss")
            # The rules' results come first, in order; compare renames a rule that shares a
            # baseline's or another rule's name ("adam (2)"), so they are not looked up by name.
            for name, r in zip(rules, c.results[: len(rules)], strict=True):
                rows.append(
                    {
                        "rule": name,
                        "task": task,
                        "steps": steps,
                        "mean_loss": r.mean_loss,
                        "final_loss": r.final_loss,
                        "ratio_a": c.ratio(r.name, "mean_loss"),
                        "ratio_b": c.ratio(r.name, "final_loss"),
                        "best_a": f"{best_a.name}@{best_a.best_lr['mean_loss']:g}",
                        "best_b": f"{best_b.name}@{best_b.best_lr['final_loss']:g}",
                        "adam_1e-3_final": c_grid(c, "adam", 1e-3),
                    }
                )
            print(c.table(), flush=True)
    print("| rule | task | steps | (a) ratio | (b) ratio | best baseline (a) | best baseline (b) | (b) vs Adam 1e-3 |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        vs_adam = row["final_loss"] / row["adam_1e-3_final"] if row["adam_1e-3_final"] else float("nan")
        print(
            f"| {row['rule']} | {row['task']} | {row['steps']} | {row['ratio_a']:.2f} | {row['ratio_b']:.2f} "
            f"| {row['best_a']} | {row['best_b']} | {vs_adam:.3g} |"
        )
    sweep = None
    (out / "quality.json").write_text(json.dumps({"rows": rows, "lr_sweep": sweep}, indent=1, default=str))
    if args.lr_sweep:
        task, steps = args.lr_sweep
        seeds = list(range(args.seed_start, args.seed_start + args.seeds))
        sweep = {r: lr_sweep(r, task, steps, seeds, Path(args.cache)) for r in rules}
        for table in sweep.values():
            for name, values in table.items():
                finite = [v for v in values.values() if v == v]
                spread = max(finite) / min(finite) if finite else float("nan")
                cells = ", ".join(f"{k:g}: {v:.4f}" for k, v in values.items())
                print(f"lr sweep {task}:{steps} {name}: {cells} (max/min {spread:.2f})")
    print(f"total {time.perf_counter() - start:.0f} s, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    (out / "quality.json").write_text(json.dumps({"rows": rows, "lr_sweep": sweep}, indent=1, default=str))


def c_grid(c, name: str, lr: float) -> float:
    """Final training loss of baseline ``name`` at exactly ``lr`` (Adam's untuned default)."""
    r = next(x for x in c.results if x.name == name)
    entry = r.grid.get(f"{lr:g}")
    return entry["final_loss"] if entry else float("nan")


if __name__ == "__main__":
    main()
