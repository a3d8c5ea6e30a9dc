"""Reports of a :class:`~learned_optim.compare.Comparison` (Markdown, JSON and learning-curve PNG)
and of a suite (:func:`write_suite_report`)."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from learned_optim._files import write_files
from learned_optim.compare import Comparison, plural

if TYPE_CHECKING:
    from learned_optim.suites import SuiteResult


def plot_curves(result: Comparison, path: str | Path) -> Path | None:
    """Learning curves (mean and min–max over seeds, log-scale loss where it is positive) of the runs
    that did not diverge, as PNG written to ``path`` (whole or not at all); None without matplotlib."""
    png = curves_png(result)
    if png is None:
        return None
    path = Path(path)
    write_files(path.parent, {path.name: png})
    return path


def curves_png(result: Comparison) -> bytes | None:
    """:func:`plot_curves`'s PNG as bytes; None without matplotlib."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    # A Figure of its own, not pyplot: the process's backend (a notebook's, a GUI's) stays as it is.
    fig = Figure(figsize=(6.4, 4.2), dpi=110)
    ax = fig.subplots()
    drawn: list[float] = []  # every value plotted
    for summary in result.results:
        curves = [c for c in summary.curves if len(c) == result.steps and all(math.isfinite(v) for v in c)]
        if not curves:
            continue
        steps = range(1, result.steps + 1)
        mean = [sum(c[t] for c in curves) / len(curves) for t in range(result.steps)]
        low = [min(c[t] for c in curves) for t in range(result.steps)]
        high = [max(c[t] for c in curves) for t in range(result.steps)]
        lr = summary.best_lr.get("final_loss")
        # lr is None when every grid point diverged by the end (the curves may still be finite).
        label = summary.name if summary.name not in result.baselines or lr is None else f"{summary.name} (lr={lr:g})"
        (line,) = ax.plot(steps, mean, label=label, linewidth=2 if summary.name not in result.baselines else 1.2)
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
        drawn += low + high
    # matplotlib warns for a log scale with no positive value (every run diverged, or the loss
    # is never positive) and for a legend with no line (every run diverged).
    if any(v > 0 for v in drawn):
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no tick at 2.5
    ax.set_xlabel("step")
    ax.set_ylabel("training minibatch loss")
    ax.set_title(f"{result.task}, {plural(len(result.seeds), 'seed')} (mean, min-max)")
    ax.grid(True, which="both", alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "every run diverged", transform=ax.transAxes, ha="center", va="center")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def markdown(result: Comparison, command: str | None = None) -> str:
    """The report as Markdown: settings, the table and how baselines were tuned."""
    lines = [f"# {result.task}: learned rules vs tuned baselines", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [
        f"{plural(result.steps, 'step')}, {plural(len(result.seeds), 'evaluation seed')} (each fixes "
        "initialisation and minibatch order for every optimizer). Baselines at their best grid learning rate "
        "for each metric; (a) mean training minibatch loss over the run, (b) loss on the whole training split "
        f"after the last step; ratios are to the best baseline on that metric; {held_out_caption(result)}",
        "",
        result.table(),
    ]
    return "\n".join(lines)


def held_out_caption(result: Comparison) -> str:
    """The sentence that says at which learning rate the baselines' held-out loss is taken."""
    if result.tune_test:
        return "baselines' held-out loss at their lr best on held-out loss itself (column lr (held-out))."
    return "held-out loss at the lr best on (b)."


def write_report(result: Comparison, out: str | Path, command: str | None = None) -> list[Path]:
    """Write ``<task>-<steps>.md``, ``.json`` and ``.png`` (the plot if matplotlib is installed) to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = _file_stem(f"{result.task}-{result.steps}")
    payload = result.to_json()
    payload["command"] = command
    files = {
        f"{stem}.md": markdown(result, command).encode(),
        f"{stem}.json": json.dumps(_finite_json(payload), indent=1, allow_nan=False).encode(),
    }
    png = curves_png(result)
    if png is not None:
        files[f"{stem}.png"] = png
    # All made before any is written, then each renamed into place: an interrupted run leaves
    # the previous report whole, not a truncated file or a plot of another run.
    write_files(out, files)
    return [out / name for name in files]


def write_suite_report(result: SuiteResult, out: str | Path, command: str | None = None) -> list[Path]:
    """Write ``suite-<name>.md`` (the command, if given, then :meth:`SuiteResult.markdown`),
    ``suite-<name>.json`` (:meth:`SuiteResult.to_json` plus the command) and, with matplotlib,
    one ``suite-<name>-<task>-<steps>.png`` per comparison to ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = _file_stem(f"suite-{result.suite}")
    text = result.markdown()
    payload = result.to_json()
    payload["command"] = command
    files = {
        f"{stem}.md": (f"```\n{command}\n```\n\n{text}" if command else text).encode(),
        f"{stem}.json": json.dumps(_finite_json(payload), indent=1, allow_nan=False).encode(),
    }
    for comparison in result.comparisons:
        name = _file_stem(f"{comparison.task}-{comparison.steps}")
        png = curves_png(comparison)
        if png is not None:
            files[f"{stem}-{name}.png"] = png
    write_files(out, files)  # as write_report: whole files, renamed into place after all are made
    paths = [out / name for name in files]
    return paths


def _file_stem(label: str) -> str:
    # Task names may be a user's free-form labels: keep the file names inside ``out``.
    return re.sub(r"[^\w.\-]+", "_", label)


def _finite_json(value: object) -> object:
    # JSON has no inf/NaN: a diverged run is written as the string "inf" / "nan".
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value
