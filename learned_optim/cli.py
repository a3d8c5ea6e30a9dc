"""Command line: ``learned-optim meta-fit | compare | list``."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import torch

from learned_optim import __version__
from learned_optim.meta_fit import META_LOSSES, VALIDATION_METRICS, MetaFitConfig, check_time_budget
from learned_optim.weights import CONFIG_NAME, MODEL_CARD_NAME, PREVIOUS_RULE_MARKER, WEIGHTS_NAME

# MetaFitConfig settings whose flag is not the setting's name with dashes.
_CONFIG_FLAGS = {"clip_grad_norm": "--clip"}


def _let_working_directory_import() -> None:
    # Like `python -m`, let a user's module in the working directory be found.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _import_modules(names: list[str]) -> None:
    """Import the modules given with ``--import``: a custom rule registers its rule_type on import."""
    if names:
        _let_working_directory_import()
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ValueError(f"--import {name}: {err}") from None


def _load_task(spec: str) -> Any:
    """A built-in task name, or ``module.path:attribute`` naming a TaskFamily (or a factory of one)."""
    from learned_optim.tasks import TaskFamily, get_task

    if ":" not in spec:
        return get_task(spec)
    module_name, _, attr = spec.partition(":")
    _let_working_directory_import()
    # ValueError, not SystemExit(message): main() turns it into "error: ..." and exit code 2
    # like every other bad argument (SystemExit with a message exits with 1).
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"cannot load task {spec!r}: {err}") from None
    if not isinstance(obj, TaskFamily) and callable(obj):
        try:
            obj = obj()
        except TypeError as err:
            raise ValueError(f"cannot build task {spec!r}: calling it failed: {err}") from None
    if not isinstance(obj, TaskFamily):
        raise ValueError(f"{spec!r} is a {type(obj).__name__}, expected a learned_optim Task/TaskFamily")
    return obj


def _loss_scaled(tasks: list[Any], scale_range: float, meta_loss: str) -> list[Any]:
    """``tasks`` with each instance's loss multiplied by a random factor in [1/R, R]."""
    from learned_optim.tasks import LossScaled

    if not (math.isfinite(scale_range) and scale_range >= 1):
        raise ValueError(f"--loss-scale-range must be a finite number >= 1 (1: off), got {scale_range}")
    if meta_loss in ("mean", "ramp"):
        raise ValueError(
            f"--loss-scale-range with --meta-loss {meta_loss}: the meta-loss would weigh instances by "
            "their loss scale; use a meta-loss relative to the initial loss (log, log-ramp, final)"
        )
    return [LossScaled(task, 1 / scale_range, scale_range) for task in tasks]


def _build_rule(args: argparse.Namespace) -> Any:
    from learned_optim.rules import get_rule_class

    cls = get_rule_class(args.rule)
    try:
        kwargs = json.loads(args.rule_config) if args.rule_config else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"--rule-config: not valid JSON ({err}): {args.rule_config!r}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(
            f"--rule-config: expected a JSON object of {cls.__name__}'s arguments, e.g. "
            f"'{{\"hidden_size\": 20}}', got a {type(kwargs).__name__}"
        )
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # unknown argument, or a value the rule rejects
        raise ValueError(f"--rule-config: {err}") from None


def _check_config(config: MetaFitConfig) -> None:
    """``config.check()``, its error prefixed with the flag that sets the offending setting."""
    try:
        config.check()
    except ValueError as err:
        message = str(err)
        named = [name for name in asdict(config) if message.startswith(name)]
        if not named:
            raise
        field = max(named, key=len)  # meta_lr_schedule, not meta_lr
        flag = _CONFIG_FLAGS.get(field, "--" + field.replace("_", "-"))
        raise ValueError(f"{flag}: {message}") from None


def _last_checkpoint_iteration(checkpoints: Path) -> int | None:
    """The meta-iteration of the checkpoint in ``checkpoints`` (None if there is none readable)."""
    try:
        return int(json.loads((checkpoints / "checkpoint.json").read_text())["history"]["iteration"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _where_to_resume(checkpoints: Path) -> str:
    done = _last_checkpoint_iteration(checkpoints)
    if done is None:
        return "no checkpoint was written yet"
    return f"{checkpoints} holds the checkpoint of meta-iteration {done}: continue with --resume"


def _is_out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:200]


def _out_of_memory_hint(config: MetaFitConfig) -> str:
    """What lowers meta-training's memory, given the flags of the run that ran out."""
    # Backpropagation through an unroll keeps every inner step's activations; recomputing
    # segments of about sqrt(unroll) steps keeps ~2*sqrt(unroll) of them for the same meta-gradient.
    ways = []
    if config.grad_checkpoint_steps == 0 and config.unroll > 4:
        segment = max(2, round(math.sqrt(config.unroll)))
        hint = "same meta-gradient, one more forward pass, --resume accepts it"
        ways.append(f"--grad-checkpoint-steps {segment} ({hint})")
    if config.instances > 1:
        ways.append(f"fewer --instances (now {config.instances})")
    ways.append(f"a shorter --unroll (now {config.unroll})")
    if config.second_order:
        ways.append("dropping --second-order")
    return "to use less memory try " + ", or ".join(ways)


def _discard_previous_run(out: Path, command: str) -> None:
    """Remove the checkpoint an earlier meta-fit left in ``out`` (for ``--overwrite``): pointer
    ``checkpoint.json`` first, then its weights and its ``last``/``best`` folders.

    Its saved rule stays, loadable, until this run's save replaces it (each file in one rename):
    a run cut off early must not cost the only good rule. :data:`PREVIOUS_RULE_MARKER` beside it
    says whose rule it is until then (loading it warns), so it is not taken for this run's.
    """
    if any((out / name).exists() for name in (CONFIG_NAME, WEIGHTS_NAME)):
        (out / PREVIOUS_RULE_MARKER).write_text(
            f"{CONFIG_NAME} and {WEIGHTS_NAME} in this folder are the rule of an earlier run.\n"
            f"On {time.strftime('%Y-%m-%d %H:%M:%S')} this command started over in this folder:\n\n"
            f"    {command}\n\n"
            "When it saves its own rule (also when it is continued with --resume), it replaces them and\n"
            "deletes this file and the earlier rule's model card (README.md). Until then, loading the\n"
            "folder gives the earlier rule, with a warning.\n"
        )
    # The old checkpoint goes at once: a later --resume must not continue the old run.
    _discard_checkpoint(out / "checkpoint")


def _discard_checkpoint(checkpoints: Path) -> None:
    """Remove meta-fit's checkpoint files from ``checkpoints``, pointer ``checkpoint.json`` first."""
    (checkpoints / "checkpoint.json").unlink(missing_ok=True)
    for stale in checkpoints.glob("checkpoint*.safetensors*"):
        stale.unlink(missing_ok=True)
    for stale in checkpoints.glob(".checkpoint.json.*.tmp"):
        stale.unlink(missing_ok=True)
    for folder in ("last", "best"):
        shutil.rmtree(checkpoints / folder, ignore_errors=True)


RUN_LOCK_NAME = "meta-fit.lock"


def _lock_run_folder(out: Path, checkpoints: Path) -> IO[str] | None:
    """Hold an exclusive lock on the run's checkpoint folder until this process ends (the OS
    drops it, also on a kill): a second meta-fit into the same ``--out`` would delete this
    run's checkpoint files as stale. None where there are no advisory locks (Windows)."""
    try:
        import fcntl
    except ImportError:
        return None
    checkpoints.mkdir(parents=True, exist_ok=True)
    handle = open(checkpoints / RUN_LOCK_NAME, "a")  # noqa: SIM115 (held open: it is the lock)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ValueError(
            f"--out {out}: another learned-optim meta-fit is running in this folder (it holds "
            f"{checkpoints / RUN_LOCK_NAME}); wait for it to end or choose another --out"
        ) from None
    return handle


def _holds_only_an_unfinished_checkpoint(out: Path) -> bool:
    """Whether ``out`` holds nothing but what a meta-fit run stopped during its first checkpoint
    leaves: a ``checkpoint`` folder without ``checkpoint.json``, holding only checkpoint files."""
    if [p.name for p in out.iterdir()] != ["checkpoint"] or not (out / "checkpoint").is_dir():
        return False
    own = ("checkpoint*.safetensors*", ".checkpoint.json.*.tmp", "last", "best", RUN_LOCK_NAME)
    return all(any(p.match(pattern) for pattern in own) for p in (out / "checkpoint").iterdir())


def _previous_rule_note(out: Path) -> str:
    """For a run stopped early: whose rule ``out`` still holds, if an ``--overwrite`` left one."""
    if not (out / PREVIOUS_RULE_MARKER).is_file():
        return ""
    return f"; {out} still holds the earlier run's rule (see {out / PREVIOUS_RULE_MARKER})"


def _output_folder(path: str) -> Path:
    """``--out`` as a folder path, checked before any work: it (or, if it does not exist yet, the
    nearest folder above it) must be a folder this process can write in; otherwise the error
    would come only when the first file is written, after the work."""
    if not path.strip():
        # Path("") is the current folder: an unset "$OUT" would write (or --overwrite) there.
        raise ValueError("--out is empty: give the folder to write to")
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {path}: exists and is not a folder")
    existing = out
    while not os.path.lexists(existing) and existing.parent != existing:
        existing = existing.parent
    if existing != out and not existing.is_dir():
        raise ValueError(f"--out {path}: cannot be created, {existing} is not a folder")
    try:
        # A real write, not os.access: it also sees read-only mounts and ACLs.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        where = "" if existing == out else f" (cannot create it in {existing})"
        raise ValueError(f"--out {path}: not writable{where}: {err.strerror or err}") from None
    return out


def _set_threads(threads: int) -> None:
    if threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: torch's default), got {threads}")
    if threads:
        torch.set_num_threads(threads)


def cmd_meta_fit(args: argparse.Namespace) -> int:
    """Meta-train a rule and save it (best validated weights) to ``--out``."""
    from learned_optim.meta_fit import MetaTrainer

    # Every argument is checked before anything is loaded, trained or removed.
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the checkpoint, or start over")
    if args.log_every < 0:
        raise ValueError(f"--log-every must be >= 0 (0: no log lines), got {args.log_every}")
    try:
        check_time_budget(args.time_budget)
    except ValueError:
        raise ValueError(f"--time-budget must be a finite number >= 0 (seconds), got {args.time_budget}") from None
    torch.manual_seed(args.seed)
    _set_threads(args.threads)
    out = _output_folder(args.out)
    checkpoints = out / "checkpoint"
    has_checkpoint = (checkpoints / "checkpoint.json").is_file()
    unfinished = not has_checkpoint and out.is_dir() and _holds_only_an_unfinished_checkpoint(out)
    if out.is_dir() and any(out.iterdir()) and not has_checkpoint and not unfinished and not args.overwrite:
        raise ValueError(
            f"--out {args.out}: the folder is not empty and holds no meta-fit checkpoint; "
            "its files would be overwritten: choose another --out or pass --overwrite"
        )
    config = MetaFitConfig(
        steps=args.steps,
        unroll=args.unroll,
        meta_iterations=args.meta_iterations,
        meta_lr=args.meta_lr,
        meta_lr_schedule=args.meta_lr_schedule,
        instances=args.instances,
        meta_loss=args.meta_loss,
        ramp_power=args.ramp_power,
        second_order=args.second_order,
        clip_grad_norm=args.clip,
        random_horizon=args.random_horizon,
        meta_grad_fraction=args.meta_grad_fraction,
        log_floor=args.log_floor,
        lr_scale_range=args.lr_scale_range,
        estimator=args.estimator,
        pes_pairs=args.pes_pairs,
        pes_std=args.pes_std,
        grad_checkpoint_steps=args.grad_checkpoint_steps,
        seed=args.seed,
        validate_every=args.validate_every,
        validation_instances=args.validation_instances,
        validation_steps=args.validation_steps,
        validation_lr_scales=args.validation_lr_scales,
        validation_metric=args.validation_metric,
        checkpoint_every=args.checkpoint_every,
    )
    _check_config(config)
    tasks = [_load_task(t) for t in args.task.split(",")]
    if args.loss_scale_range != 1.0:
        tasks = _loss_scaled(tasks, args.loss_scale_range, args.meta_loss)
    rule = _build_rule(args)
    if args.init:
        from learned_optim.weights import resolve_rule

        start_rule = resolve_rule(args.init)
        try:
            rule.init_from(start_rule)
        except ValueError as err:
            raise ValueError(f"--init {args.init}: {err}; set --rule/--rule-config to match") from None
        if start_rule.config != rule.config:  # extended (e.g. wider, new inputs): say so, it may be unintended
            print(f"--init {args.init}: its {start_rule.config} continues as {rule.config}", file=sys.stderr)
    if args.train_only:
        _freeze_all_but(rule, args.train_only)
    start = time.time()

    def log_line(history: Any) -> None:
        if args.log_every and history.iteration % args.log_every == 0:
            recent = history.meta_losses[-args.log_every :]
            val = history.validation[-1][1] if history.validation else float("nan")
            print(
                f"it {history.iteration} meta_loss {sum(recent) / len(recent):.4f} val {val:.4f} "
                f"best {history.best_validation:.4f}@{history.best_iteration} skipped {history.skipped_updates} "
                f"{time.time() - start:.0f}s",
                flush=True,
            )

    run_lock = _lock_run_folder(out, checkpoints)
    try:
        trainer = MetaTrainer(
            rule, tasks, config, checkpoints, progress=not args.quiet, time_budget=args.time_budget, callback=log_line
        )
        if args.resume and has_checkpoint:
            trainer.load_checkpoint(checkpoints)
            print(f"resumed at meta-iteration {trainer.history.iteration}", file=sys.stderr)
        elif has_checkpoint and not args.overwrite:
            raise ValueError(f"{checkpoints} holds a checkpoint; pass --resume to continue or --overwrite")
        elif args.overwrite:
            _discard_previous_run(out, _command_line(args))
        elif unfinished:
            # Stopped while writing its first checkpoint: nothing to resume, start afresh.
            _discard_checkpoint(checkpoints)
        try:
            rule = trainer.run()
        except KeyboardInterrupt:
            where = _where_to_resume(checkpoints)
            print(
                f"interrupted at meta-iteration {trainer.history.iteration}; {where}{_previous_rule_note(out)}",
                file=sys.stderr,
            )
            return 130
        except (RuntimeError, MemoryError) as err:
            if not _is_out_of_memory(err):
                raise
            print(
                f"error: out of memory at meta-iteration {trainer.history.iteration} ({_first_line(err)}); "
                f"{_out_of_memory_hint(config)}; {_where_to_resume(checkpoints)}{_previous_rule_note(out)}",
                file=sys.stderr,
            )
            return 1
        h = trainer.history
        metadata = {
            "command": _command_line(args),
            "meta_iterations": h.iteration,
            "meta_training_seconds": round(h.seconds, 1),
            "best_iteration": h.best_iteration,
            # JSON has no Infinity: no validation (or none finite) is written as null.
            "best_validation": h.best_validation if math.isfinite(h.best_validation) else None,
            "skipped_updates": h.skipped_updates,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d"),
            "tasks": args.task,
        }
        from learned_optim.weights import save_pretrained

        save_pretrained(rule, out, metadata=metadata)
        if (out / PREVIOUS_RULE_MARKER).is_file():
            # The folder's rule is this run's now; an earlier run's model card described the old one.
            (out / MODEL_CARD_NAME).unlink(missing_ok=True)
            (out / PREVIOUS_RULE_MARKER).unlink()
        if h.best_iteration >= 0:
            validation = f"best validation {h.best_validation:.4f} at {h.best_iteration}"
        elif args.validate_every == 0:
            validation = "no validation (--validate-every 0): final weights"
        else:
            validation = "no finite validation score: final weights"
        print(
            f"saved {out} (meta-iterations {h.iteration}, {h.seconds:.0f} s, {validation}, "
            f"skipped updates {h.skipped_updates})"
        )
        return 0
    finally:
        if run_lock is not None:
            run_lock.close()  # not left to garbage collection: a traceback would keep it held


def _command_line(args: argparse.Namespace) -> str:
    return "learned-optim " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:]))


def cmd_compare(args: argparse.Namespace) -> int:
    """Compare rules against tuned baselines; print the table, write reports."""
    from learned_optim.compare import compare
    from learned_optim.report import write_report

    _set_threads(args.threads)
    if args.seed_start is not None:
        if args.suite:
            raise ValueError("--seed-start is not supported with --suite (suites fix their own seeds)")
        if args.seed_start < 0:
            raise ValueError(f"--seed-start must be a non-negative integer, got {args.seed_start}")
    out = _output_folder(args.out)
    rules = [r for r in args.rules.split(",") if r]
    rule_lrs = _parse_rule_lrs(args.rule_lr)
    args.seeds_given = args.seeds is not None
    if args.seeds is None:
        args.seeds = 10
    if args.suite:
        if rule_lrs != 1.0:
            raise ValueError("--rule-lr is not supported with --suite; compare one task at a time")
        return _run_suite(args, rules)
    family = _load_task(args.task)
    task_name = args.task if ":" not in args.task else args.task.split(":")[-1]
    result = compare(
        family if ":" in args.task else args.task,
        rules=rules,
        steps=args.steps,
        seeds=args.seeds if args.seed_start is None else range(args.seed_start, args.seed_start + args.seeds),
        baselines=args.baselines.split(","),
        cache_path=out / ".cache" / f"{task_name}.json",
        progress=not args.quiet,
        rule_lrs=rule_lrs,
    )
    print(result.table())
    paths = write_report(result, out, command=_command_line(args))
    for p in paths:
        print(f"wrote {p}")
    return 0


def _parse_rule_lrs(text: str) -> float | list[float]:
    """``--rule-lr``: one multiplier, or a comma separated list of them."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--rule-lr must be numbers separated by commas, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _freeze_all_but(rule: Any, prefixes_text: str) -> None:
    """Leave only the rule's parameters whose names start with one of the prefixes trainable."""
    prefixes = [p.strip() for p in prefixes_text.split(",") if p.strip()]
    names = [name for name, _ in rule.named_parameters()]
    for prefix in prefixes:
        if not any(name.startswith(prefix) for name in names):
            raise ValueError(
                f"--train-only {prefix!r}: no parameter of {rule.rule_type} starts with it (its parameters: "
                f"{', '.join(names)})"
            )
    for name, param in rule.named_parameters():
        param.requires_grad_(any(name.startswith(prefix) for prefix in prefixes))


MAX_SEED = 2**63 - 1
"""The largest ``--seed``: seeds are kept as 64-bit integers (torch's generators, checkpoints)."""


def _seed(text: str) -> int:
    """``--seed``: an integer in [0, :data:`MAX_SEED`] (a larger one overflowed in torch.manual_seed)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, {MAX_SEED}] (2**63 - 1), got {text}")
    return value


def _parse_lr_scales(text: str) -> tuple[float, ...]:
    """``--validation-lr-scales``: comma-separated multipliers, each a finite number > 0."""
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not all(0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"every multiplier must be a finite number > 0, got {text!r}")
    return values


def _run_suite(args: argparse.Namespace, rules: list[str]) -> int:
    from learned_optim.report import write_suite_report
    from learned_optim.suites import run_suite

    out = _output_folder(args.out)
    seeds = args.seeds if args.seeds_given else None
    result = run_suite(
        args.suite,
        rules,
        seeds=seeds,
        progress=not args.quiet,
        cache_dir=str(out / ".cache"),
        baselines=args.baselines.split(","),
    )
    print(result.markdown())
    for path in write_suite_report(result, out, command=_command_line(args)):
        print(f"wrote {path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """List bundled rules and built-in tasks."""
    from learned_optim.tasks import list_tasks
    from learned_optim.weights import DEFAULT_RULE, list_pretrained

    print("bundled rules:", ", ".join(list_pretrained()) or "none", f"(default: {DEFAULT_RULE})")
    print("tasks:", ", ".join(list_tasks()))
    return 0


def _add_import_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first, e.g. the one defining a custom rule (repeatable; the working directory is searched)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``learned-optim`` argument parser."""
    parser = argparse.ArgumentParser(prog="learned-optim", description="Learned optimizers for PyTorch.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    mf = sub.add_parser("meta-fit", help="meta-train an update rule on a task family")
    mf.add_argument("--task", required=True, help="task name(s), comma separated, or module:attribute")
    mf.add_argument("--out", required=True, help="output directory (rule files; checkpoints in OUT/checkpoint)")
    mf.add_argument("--rule", default="CoordinateLSTM", help="rule type (a custom one: see --import)")
    _add_import_option(mf)
    mf.add_argument("--rule-config", default="", help="JSON of rule arguments, e.g. '{\"hidden_size\": 20}'")
    mf.add_argument("--seed", type=_seed, default=0, help=f"random seed, an integer in [0, {MAX_SEED}]")
    mf.add_argument("--steps", type=int, default=100, help="inner steps per task instance")
    mf.add_argument("--unroll", type=int, default=20, help="inner steps per truncation")
    mf.add_argument("--meta-iterations", type=int, default=1000)
    mf.add_argument("--meta-lr", type=float, default=3e-3)
    mf.add_argument("--meta-lr-schedule", choices=("constant", "cosine"), default="constant")
    mf.add_argument("--init", default=None, help="start from these weights (bundled name, folder or Hub id)")
    mf.add_argument(
        "--train-only",
        default="",
        help="comma separated prefixes of the rule's parameter names: train only those, the rest stays "
        "fixed (e.g. step_size_in for a new input of a rule continued with --init)",
    )
    mf.add_argument("--instances", type=int, default=1, help="task instances per meta-iteration")
    mf.add_argument("--meta-loss", choices=META_LOSSES, default="log")
    mf.add_argument(
        "--ramp-power",
        type=float,
        default=1.0,
        help="with --meta-loss ramp or log-ramp: step t weighs in proportion to t**p (1: linear; larger: "
        "the last steps count more)",
    )
    mf.add_argument("--second-order", action="store_true")
    mf.add_argument("--clip", type=float, default=1.0, help="meta-gradient norm clip (0: off)")
    mf.add_argument(
        "--random-horizon", action="store_true", help="horizons drawn log-uniformly between --steps/4 and 4x --steps"
    )
    mf.add_argument(
        "--meta-grad-fraction", type=float, default=1.0, help="backpropagate through this fraction of coordinates"
    )
    mf.add_argument(
        "--log-floor",
        type=float,
        default=0.0,
        help="with --meta-loss log, log-ramp or final: count f_t/f_0 as at least this (0: off)",
    )
    mf.add_argument(
        "--lr-scale-range",
        type=float,
        default=1.0,
        help="scale each training instance's updates by a random factor in [1/R, R] (1: off)",
    )
    mf.add_argument(
        "--loss-scale-range",
        type=float,
        default=1.0,
        help="multiply each instance's loss by a random factor in [1/R, R] (1: off; needs a log meta-loss)",
    )
    mf.add_argument(
        "--estimator",
        choices=("tbptt", "pes"),
        default="tbptt",
        help="meta-gradient: backpropagation through each truncation (tbptt) or persistent evolution "
        "strategies (pes: forward only, unbiased over the whole horizon)",
    )
    mf.add_argument("--pes-pairs", type=int, default=8, help="antithetic pairs per instance (--estimator pes)")
    mf.add_argument("--pes-std", type=float, default=0.01, help="perturbation std of the rule's weights (pes)")
    mf.add_argument(
        "--grad-checkpoint-steps",
        type=int,
        default=0,
        help="gradient checkpointing: recompute the unroll in segments of this many steps in the backward "
        "pass (same meta-gradient, much less memory for long unrolls; 0: off)",
    )
    mf.add_argument("--validate-every", type=int, default=50)
    mf.add_argument("--validation-instances", type=int, default=4)
    mf.add_argument("--validation-steps", type=int, default=0, help="horizon of validation runs (0: --steps)")
    mf.add_argument(
        "--validation-lr-scales",
        type=_parse_lr_scales,
        default=(1.0,),
        help="run each validation instance at each of these comma-separated lr multipliers and score the mean "
        "(default: 1)",
    )
    mf.add_argument(
        "--validation-metric",
        choices=VALIDATION_METRICS,
        default="objective",
        help="score validation runs by the meta-loss (objective) or by the whole-training-split loss after "
        "the last step relative to before the first (final); the best-scoring checkpoint is kept",
    )
    mf.add_argument("--checkpoint-every", type=int, default=25)
    mf.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="stop after this many seconds of meta-training, counted over the whole run (resumes included)",
    )
    mf.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    mf.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    mf.add_argument(
        "--overwrite",
        action="store_true",
        help="start over even if OUT holds a checkpoint (deleted at the start) or a rule (kept until this run "
        f"saves its own, marked by {PREVIOUS_RULE_MARKER})",
    )
    mf.add_argument("--quiet", action="store_true", help="no progress bar")
    mf.add_argument("--log-every", type=int, default=0, help="print a log line every N meta-iterations")
    mf.set_defaults(func=cmd_meta_fit)

    cp = sub.add_parser("compare", help="compare learned rules with tuned Adam, RMSprop, SGD, Nesterov")
    cp.add_argument("--task", default="mnist-mlp", help="task name or module:attribute")
    cp.add_argument("--rules", default="default", help="comma separated: default, bundled names, dirs, Hub ids")
    _add_import_option(cp)
    cp.add_argument(
        "--rule-lr",
        default="1",
        help="lr multiplier of the rules: one value for all or one per rule, comma separated (default 1, "
        "the working point they are meta-trained at)",
    )
    cp.add_argument("--steps", type=int, default=100)
    cp.add_argument("--seeds", type=int, default=None, help="evaluation seeds (default 10; seed-xor: 500)")
    cp.add_argument(
        "--seed-start",
        type=int,
        default=None,
        help="first evaluation seed (default: the standard evaluation seeds; another start gives fresh "
        "seeds never used to choose between rules)",
    )
    cp.add_argument("--suite", choices=("paper", "seed-xor"), default=None, help="run a benchmark suite")
    cp.add_argument("--baselines", default="adam,rmsprop,sgd,nesterov")
    cp.add_argument("--out", default="results")
    cp.add_argument("--threads", type=int, default=0)
    cp.add_argument("--quiet", action="store_true")
    cp.set_defaults(func=cmd_compare)

    ls = sub.add_parser("list", help="list bundled rules and built-in tasks")
    ls.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``learned-optim`` command."""
    args = build_parser().parse_args(argv)
    # The command recorded in reports and metadata: argv when called as main([...]), not
    # the host program's sys.argv.
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _import_modules(getattr(args, "imports", []))
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (PermissionError, NotADirectoryError, IsADirectoryError) as err:
        # A file the run writes (or reads) turned out inaccessible: the message names it.
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside meta-training: no traceback, the usual status
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
