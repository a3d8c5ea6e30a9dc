"""Write a bundled rule's model card (README.md) from its config metadata and a fresh evaluation.

The card states the meta-training command, time and machine (recorded by
`learned-optim meta-fit` in config.json) and an evaluation table made by the comparison
harness on evaluation seeds never used in meta-training.

    python benchmarks/model_card.py pretrained/lstm-mnist --title "..." --problems mnist-mlp:100,mnist-mlp-relu:100

Without --title it only re-runs the evaluation and prints the tables (the card's own
evaluation command), leaving README.md as it is.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch
from _args import positive_int, task_steps_list

from learned_optim.compare import compare


def cpu_name() -> str:
    """The CPU model as lscpu reports it (or the platform's processor string)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass  # no lscpu: fall back to what the platform module knows
    return platform.processor() or "unknown CPU"


def earlier_stage(folder: Path) -> tuple[str, float | None]:
    """The command and meta-training seconds recorded in an earlier stage's config.json."""
    path = folder / "config.json"
    try:
        meta = json.loads(path.read_text()).get("metadata", {})
    except (OSError, ValueError, AttributeError) as err:
        raise SystemExit(f"--before-run {folder}: cannot read the metadata of {path}: {err}") from None
    if "command" not in meta:
        raise SystemExit(f"--before-run {folder}: {path} records no meta-fit command")
    return meta["command"], meta.get("meta_training_seconds")


def total_time(stage_seconds: list[float | None], unrecorded: int) -> str:
    """The total-time clause of a multi-stage card (the stages' times summed when all are known);
    nothing for a single stage."""
    if len(stage_seconds) < 2:
        return ""
    if unrecorded or any(s is None for s in stage_seconds):
        return "for the last stage (earlier stages' times not all recorded) "
    parts = " + ".join(f"{s:.0f}" for s in stage_seconds)
    return f"for the last stage (all {len(stage_seconds)} stages: {parts} = {sum(stage_seconds):,.0f} s) "


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rule_dir")
    parser.add_argument("--title", help="the card's title; without it, only print the evaluation (no README.md)")
    parser.add_argument("--description", default="")
    parser.add_argument("--problems", required=True, help="comma separated task:steps")
    parser.add_argument("--seeds", type=positive_int, default=10)
    parser.add_argument("--machine", default="", help="how meta-training ran (default: this machine)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default="results/.cache", help="folder caching baseline runs")
    parser.add_argument(
        "--before",
        action="append",
        default=[],
        help="a command run before the recorded one (e.g. the run whose weights --init starts from); repeatable",
    )
    parser.add_argument(
        "--before-run",
        action="append",
        default=[],
        metavar="DIR",
        help="the --out folder of an earlier stage (in order, after any --before): its recorded command is "
        "listed and its meta-training time added to the total; repeatable",
    )
    args = parser.parse_args()
    try:
        problems = task_steps_list(args.problems)
    except argparse.ArgumentTypeError as err:
        parser.error(f"--problems: {err}")
    torch.set_num_threads(args.threads)
    rule_dir = Path(args.rule_dir)
    config = json.loads((rule_dir / "config.json").read_text())
    meta = config.get("metadata", {})
    earlier = [earlier_stage(Path(folder)) for folder in args.before_run]
    commands = [*args.before, *(command for command, _ in earlier)]
    stage_seconds = [seconds for _, seconds in earlier] + [meta.get("meta_training_seconds")]
    machine = (
        args.machine
        or f"{cpu_name()} (2 cores), {meta.get('threads', '?')} torch thread(s), torch {meta.get('torch', '?')}"
    )
    rows = []
    tables = []
    start = time.perf_counter()
    for task, steps in problems:
        c = compare(
            task,
            [str(rule_dir)],
            int(steps),
            args.seeds,
            cache_path=Path(args.cache) / f"{task}.json",
            progress=False,
            rule_names=["this rule"],
        )
        rows.append(
            f"| {task} | {steps} | {c.ratio('this rule', 'mean_loss'):.2f} | {c.ratio('this rule', 'final_loss'):.2f} "
            f"| {c.best_baseline('mean_loss').name} | {c.best_baseline('final_loss').name} |"
        )
        tables.append(f"#### {task}, {steps} steps\n\n{c.table()}")
    eval_seconds = time.perf_counter() - start
    summary = (
        "| task | steps | (a) ratio | (b) ratio | best baseline (a) | best baseline (b) |\n|---|---|---|---|---|---|\n"
    )
    if args.title is None:
        print(summary + chr(10).join(rows) + "\n\n" + chr(10).join(tables))
        print(f"\n({eval_seconds:.0f} s; {rule_dir / 'README.md'} not written: pass --title to write the card)")
        return
    card = f"""# {rule_dir.name}: {args.title}

{args.description}

- Rule: `{config["rule_type"]}` with config `{json.dumps(config["config"])}`.
- Load: `LearnedOptimizer(model.parameters(), pretrained="{rule_dir.name}")`.

## How it was made

```
{"".join(line + chr(10) for line in commands)}{meta.get("command", "(command not recorded)")}
```

then `config.json` and `model.safetensors` of the `--out` folder are copied into `pretrained/{rule_dir.name}/`.
Meta-training is deterministic for a seed on a given machine, torch version and version of this library
(changes to the kernels' rounding move the last digits of a re-run).

- Meta-training: {meta.get("meta_iterations", "?")} meta-iterations, {meta.get("meta_training_seconds", "?")} s
  {total_time(stage_seconds, len(args.before))}wall-clock on {machine}, {meta.get("date", "?")};
  best validation at iteration {meta.get("best_iteration", "?")};
  {meta.get("skipped_updates", 0)} skipped (non-finite) updates.
  Other jobs shared the 2 cores during the run, so the time is an upper bound.
{("- " + meta["note"] + ".") if meta.get("note") else ""}

## Evaluation

`python benchmarks/model_card.py {args.rule_dir} --problems {args.problems} --seeds {args.seeds}`
({eval_seconds:.0f} s). {args.seeds} evaluation seeds never used in meta-training; each fixes initialisation
and minibatch order for every optimizer. Baselines (Adam, RMSprop, SGD, Nesterov SGD) at their best
half-decade grid learning rate for each metric. (a) mean training minibatch loss over the run, (b) loss on
the whole training split after the last step; ratios to the best baseline (below 1: better than every
tuned baseline).

{summary}{chr(10).join(rows)}

{chr(10).join(tables)}
"""
    (rule_dir / "README.md").write_text(card)
    print(card)


if __name__ == "__main__":
    main()
