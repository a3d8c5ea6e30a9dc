"""Meta-training update rules by truncated backpropagation through unrolled optimisation.

The optimizee is the user's ``nn.Module`` run functionally (``torch.func.functional_call``)
so that its parameters after ``t`` learned steps are a differentiable function of the
rule's weights. One meta-iteration unrolls ``unroll`` inner steps on a batch of task
instances, takes one meta-gradient step on the rule, and carries the (detached)
optimizee parameters and rule state into the next truncation until the instance has
run ``steps`` steps; then a fresh instance is sampled. With ``estimator="pes"`` the
meta-gradient comes from persistent evolution strategies instead: antithetic pairs of
perturbed rules run each truncation forward only, and their accumulated perturbations make
the estimate unbiased over the whole horizon.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import random
import secrets
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as deserialize_tensors
from safetensors.torch import save as serialize_tensors
from torch import Tensor
from torch.func import functional_call

from learned_optim._files import write_files
from learned_optim.rules.base import (
    RuleState,
    StepContext,
    UpdateRule,
    check_finalize_output,
    check_rule_output,
    check_state_specs,
    checked_initial_state,
    config_bool,
    config_float,
    config_int,
    step_scales,
)
from learned_optim.tasks import (
    Task,
    TaskError,
    TaskFamily,
    TaskInstance,
    get_task,
    sample_instance,
    validate_instance,
)
from learned_optim.tasks._common import EVALUATION_SEED_BASE, TRAIN_SEEDS, VALIDATION_SEED_BASE, derive_seed
from learned_optim.tasks.base import check_task_data, unused_parameters_message
from learned_optim.weights import check_savable, save_pretrained

META_LOSSES = ("log", "mean", "ramp", "log-ramp", "final")
VALIDATION_METRICS = ("objective", "final")
ESTIMATORS = ("tbptt", "pes")

# What a damaged or foreign checkpoint raises while it is read.
_UNREADABLE_CHECKPOINT = (
    KeyError,
    TypeError,
    AttributeError,
    IndexError,
    RuntimeError,
    SafetensorError,
    json.JSONDecodeError,
    FileNotFoundError,  # the weights file checkpoint.json names
)

__all__ = [
    "EVALUATION_SEED_BASE",
    "MetaFitConfig",
    "MetaTrainer",
    "Task",
    "meta_fit",
    "rollout",
]


@dataclass
class MetaFitConfig:
    """Hyper-parameters of meta-training (all saved with checkpoints).

    Attributes:
        steps: inner steps per task instance (the horizon); with ``random_horizon`` the
            middle (geometric mean) of a log-uniform draw between ``steps/4`` and ``4*steps``.
        unroll: inner steps per truncation (one meta-gradient step each).
        meta_iterations: meta-gradient steps in total (0: only validate the starting rule).
        meta_lr: Adam learning rate on the rule's weights.
        meta_lr_schedule: ``"constant"``, or ``"cosine"``: decays ``meta_lr`` to 5% of it
            at ``meta_iterations`` (late meta-gradient noise otherwise keeps moving the rule
            away from its best validation).
        instances: task instances optimised side by side in each meta-iteration.
        meta_loss: ``"log"``: mean over steps of ``log(f_t / f_0)`` (scale-free, so problems
            of different scales weigh alike); ``"mean"``: mean of ``f_t`` (the paper);
            ``"ramp"``: mean of ``f_t`` weighted by ``2t / (T + 1)`` over the horizon ``T``
            (weights of mean 1 growing linearly: the late losses, and the final one most,
            count more than the first ones); ``"log-ramp"``: ``log(f_t / f_0)`` weighted the
            same way (scale-free, and the end of the run counts most); ``"final"``:
            ``log(F / f_0)`` with ``F`` the loss on the instance's whole training split (eval
            mode; the minibatch otherwise measured when it has none) after each truncation's
            last step: with ``unroll == steps``, the final training loss a comparison ranks by.
        ramp_power: with ``"ramp"`` or ``"log-ramp"``, step ``t`` weighs in proportion to
            ``t ** ramp_power`` (weights of mean 1 over the horizon): ``1`` is the linear ramp,
            larger values concentrate the objective on the last steps.
        second_order: backpropagate through the optimizee's gradients too.
        clip_grad_norm: meta-gradient norm clip (``0`` disables).
        random_horizon: draw each instance's horizon log-uniformly between ``steps/4`` and ``4*steps``.
        seed: fixes instance sampling and horizons.
        validate_every: meta-iterations between validations (``0`` disables).
        validation_instances: held-out instances per validation.
        validation_steps: horizon of the validation runs (``0``: ``steps``). Longer than the
            meta-training horizons, it selects rules that stay stable past them.
        validation_metric: how a validation run is scored. ``"objective"``: the meta-loss of
            its minibatch losses; ``"final"``: ``log(F(θ_T) / F(θ_0))``, where ``F`` is the loss
            on the instance's whole training split (the next minibatch when it has none) and
            ``T`` the validation horizon: the checkpoint kept is the one that ends lowest.
        checkpoint_every: meta-iterations between checkpoints (when a directory is given).
        meta_grad_fraction: backpropagate through a random fraction of the coordinates per
            truncation (the rest run under ``no_grad``), scaled up by its inverse. The
            first-order meta-gradient is a sum over coordinates, so this is an unbiased
            estimate that costs a fraction of the backward pass (coordinatewise rules only).
        log_floor: with ``meta_loss="log"``, ``"log-ramp"`` or ``"final"``, each ``f_t / f_0`` counts as at least this
            (``0``: no floor). Problems that can be solved to machine precision otherwise
            dominate the objective and reward ever-growing steps.
        lr_scale_range: each meta-training instance's updates are multiplied by a factor drawn
            log-uniformly from ``[1/r, r]`` (``1``: off), so the rule learns to correct a
            learning rate that is off by that much.
        validation_lr_scales: the validation runs each held-out instance once per factor here,
            its updates multiplied by it, and scores the mean over all runs. ``(1.0,)``
            (default) scores the rule as meta-trained; e.g. ``(0.1, 1.0, 10.0)`` keeps the
            checkpoint that is best across learning rates a user might set.
        estimator: how the meta-gradient is estimated. ``"tbptt"``: backpropagation through
            each truncation (exact within it, blind to what the rule's state does to later
            truncations: the short-horizon bias). ``"pes"``: persistent evolution strategies
            (Vicol et al. 2021): antithetic pairs of perturbed rules run forward only, each
            pair's perturbations accumulated over the truncations of its instance, which makes
            the sum of truncation estimates unbiased for the gradient of the whole horizon's
            (Gaussian-smoothed) meta-loss.
        pes_pairs: antithetic perturbation pairs per instance (``estimator="pes"``).
        pes_std: standard deviation of the perturbations of the rule's weights (``"pes"``).
        grad_checkpoint_steps: gradient checkpointing of the unroll (``0``: off): keep only
            every this many steps' parameters and rule state for the backward pass and
            recompute the steps in between, for about one more forward pass. The meta-gradient
            is the same; memory falls from ``unroll`` steps of activations to about
            ``unroll / n + n`` (``n`` near ``sqrt(unroll)`` minimises it), so much longer whole
            unrolls fit.
    """

    steps: int = 100
    unroll: int = 20
    meta_iterations: int = 1000
    meta_lr: float = 3e-3
    meta_lr_schedule: str = "constant"
    instances: int = 1
    meta_loss: str = "log"
    ramp_power: float = 1.0
    second_order: bool = False
    clip_grad_norm: float = 1.0
    random_horizon: bool = False
    seed: int = 0
    validate_every: int = 50
    validation_instances: int = 4
    validation_steps: int = 0
    validation_metric: str = "objective"
    checkpoint_every: int = 50
    meta_grad_fraction: float = 1.0
    log_floor: float = 0.0
    lr_scale_range: float = 1.0
    estimator: str = "tbptt"
    pes_pairs: int = 8
    pes_std: float = 0.01
    grad_checkpoint_steps: int = 0
    validation_lr_scales: tuple[float, ...] = (1.0,)

    def check(self) -> None:
        """Raise ValueError naming the first invalid setting (types included)."""
        for name in (
            "steps",
            "unroll",
            "instances",
            "validation_instances",
            "checkpoint_every",
            "pes_pairs",
        ):
            config_int(name, getattr(self, name), minimum=1)
        # meta_iterations 0: validate and return the starting rule (e.g. --init with a changed
        # non-weight option such as an lr bound), recorded like any other run.
        for name in ("meta_iterations", "validate_every", "validation_steps", "grad_checkpoint_steps"):
            config_int(name, getattr(self, name), minimum=0)
        config_int("seed", self.seed, minimum=0, maximum=2**63 - 1)  # torch.manual_seed's range
        for name in ("meta_lr", "clip_grad_norm", "meta_grad_fraction", "log_floor", "lr_scale_range", "pes_std",
                     "ramp_power"):  # fmt: skip
            config_float(name, getattr(self, name))
        for name in ("second_order", "random_horizon"):
            config_bool(name, getattr(self, name))
        if self.meta_loss not in META_LOSSES:
            raise ValueError(f"meta_loss must be one of {', '.join(map(repr, META_LOSSES))}, got {self.meta_loss!r}")
        if not 0 <= self.ramp_power <= 16:
            raise ValueError(f"ramp_power must be in [0, 16], got {self.ramp_power}")
        if self.validation_metric not in VALIDATION_METRICS:
            raise ValueError(
                f"validation_metric must be one of {', '.join(map(repr, VALIDATION_METRICS))}, "
                f"got {self.validation_metric!r}"
            )
        if not self.meta_lr > 0:
            raise ValueError(f"meta_lr must be > 0, got {self.meta_lr}")
        if self.clip_grad_norm < 0:  # would silently mean "no clipping", like 0
            raise ValueError(f"clip_grad_norm must be >= 0 (0: no clipping), got {self.clip_grad_norm}")
        if self.meta_lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"meta_lr_schedule must be 'constant' or 'cosine', got {self.meta_lr_schedule!r}")
        if not 0 < self.meta_grad_fraction <= 1:
            raise ValueError(f"meta_grad_fraction must be in (0, 1], got {self.meta_grad_fraction}")
        if self.meta_grad_fraction < 1 and self.second_order:
            raise ValueError("meta_grad_fraction < 1 needs first-order meta-gradients (second_order=False)")
        if not 0 <= self.log_floor < 1:
            raise ValueError(f"log_floor must be in [0, 1), got {self.log_floor}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {', '.join(map(repr, ESTIMATORS))}, got {self.estimator!r}")
        if not (self.pes_std > 0 and math.isfinite(self.pes_std)):  # also unused: a typo is still named
            raise ValueError(f"pes_std must be a finite number > 0, got {self.pes_std}")
        if self.estimator == "pes" and (self.second_order or self.meta_grad_fraction < 1):
            raise ValueError(
                "estimator='pes' runs the rule forward only: second_order and meta_grad_fraction < 1 "
                "apply to estimator='tbptt'"
            )
        if not self.lr_scale_range >= 1:
            raise ValueError(f"lr_scale_range must be >= 1, got {self.lr_scale_range}")
        scales = self.validation_lr_scales
        if (
            not isinstance(scales, (tuple, list))
            or not scales
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scales)
            or not all(0 < x < math.inf for x in scales)
        ):
            raise ValueError(f"validation_lr_scales must be a non-empty sequence of finite numbers > 0, got {scales!r}")


@dataclass
class _Particle:
    """One perturbed copy of an instance's trajectory (``estimator="pes"``)."""

    params: list[Tensor]
    state: RuleState
    segment_state: RuleState
    global_state: RuleState
    buffers: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class _Carry:
    """What one step of an unroll hands to the next, for every run side by side."""

    params: list[list[Tensor]]
    states: list[RuleState]
    segment_states: list[RuleState]
    global_states: list[RuleState]
    subset_state: RuleState | None = None
    # Each run's model buffers (e.g. BatchNorm's running statistics): carried like the
    # parameters, so that a recomputed segment starts from the same ones.
    buffers: list[dict[str, Tensor]] = field(default_factory=list)


@dataclass
class _Run:
    """One task instance being optimised, with what is needed to rebuild it after a restart."""

    family_index: int
    seed: int
    horizon: int
    instance: TaskInstance
    names: list[str]
    params: list[Tensor]
    state: RuleState
    segment_state: RuleState = field(default_factory=dict)
    global_state: RuleState = field(default_factory=dict)
    buffers: dict[str, Tensor] = field(default_factory=dict)
    steps_done: int = 0
    batches_used: int = 0
    initial_loss: float = float("nan")
    pending_batch: Any = None
    lr_scale: float = 1.0
    # estimator="pes": trajectories of the +/- perturbed rules (pair j: 2j and 2j + 1) and
    # each pair's perturbation summed over this instance's truncations so far.
    particles: list[_Particle] | None = None
    pes_noise: Tensor | None = None


@dataclass
class MetaFitHistory:
    """What happened during meta-training (also written to checkpoints)."""

    iteration: int = 0
    meta_losses: list[float] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    best_validation: float = float("inf")
    best_iteration: int = -1
    skipped_updates: int = 0
    seconds: float = 0.0


def _flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _ramp_weights(steps: Tensor, horizon: int, power: float = 1.0) -> Tensor:
    """Weights ``T t^p / Σ_s s^p`` of steps ``t`` of ``1..T``: mean 1 over the horizon
    (``2t / (T + 1)`` for ``p = 1``)."""
    if power == 1.0:
        return 2.0 * steps / (horizon + 1)
    total = torch.arange(1, horizon + 1, dtype=torch.float64).pow(power).sum()
    return (steps.to(torch.float64).pow(power) * (horizon / total)).to(steps.dtype)


def _log_ratio(losses: Tensor, initial: float, floor: float) -> Tensor:
    """``log(f_t / f_0)``, at least ``log(floor)`` when ``floor > 0``."""
    ratio = torch.log(losses.clamp_min(1e-12) / initial)
    return ratio.clamp_min(math.log(floor)) if floor > 0 else ratio


def _objective(losses: Tensor, initial: float, first_step: int, horizon: int, config: MetaFitConfig) -> Tensor:
    """The meta-loss of consecutive losses after steps ``first_step, first_step + 1, ...`` of a run."""
    # At least fp32: in fp16 the 1e-12 clamp rounds to 0 (log gives -inf, every update is
    # skipped) and bf16 step indices above 256 are not exact.
    losses = losses.to(torch.promote_types(losses.dtype, torch.float32))
    if config.meta_loss == "final":  # the truncation's end alone (a whole-split loss)
        return _log_ratio(losses[-1:], initial, config.log_floor).mean()
    values = losses
    if config.meta_loss in ("log", "log-ramp"):
        # Non-finite or non-positive losses would break the log: clamp, NaN stays NaN.
        values = _log_ratio(losses, initial, config.log_floor)
    if config.meta_loss in ("ramp", "log-ramp"):
        steps = torch.arange(first_step, first_step + len(losses), dtype=losses.dtype)
        values = values * _ramp_weights(steps, horizon, config.ramp_power)
    return values.mean()


def _log_uniform_horizon(rng: random.Random, mean: int) -> int:
    # Log-uniform between mean/4 and 4*mean: short unrolls are common, long ones appear.
    return max(2, round(math.exp(rng.uniform(math.log(mean / 4), math.log(mean * 4)))))


@contextlib.contextmanager
def _global_rng(seed: int, stream: str) -> Iterator[None]:
    """The global RNG seeded for ``stream`` of instance ``seed``, and restored afterwards.

    Random layers (dropout) draw from the global RNG: seeding it per instance and batch makes
    their masks a function of the instance and the step alone, so a resumed run repeats them,
    the +/- trajectories of PES share them, and the caller's RNG is left untouched.
    """
    # The CPU generator directly: torch.manual_seed / fork_rng cost ~100x more per step
    # (they visit every backend), which doubled the time of small meta-training steps.
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(derive_seed(seed, stream))
    try:
        yield
    finally:
        generator.set_state(state)


def _carry_tensors(carry: _Carry) -> list[Tensor]:
    """Every tensor of ``carry``, in a fixed order."""
    tensors = [p for params in carry.params for p in params]
    for states in (carry.states, carry.segment_states, carry.global_states):
        tensors += [state[k] for state in states for k in sorted(state)]
    if carry.subset_state is not None:
        tensors += [carry.subset_state[k] for k in sorted(carry.subset_state)]
    return tensors


def _carry_leaves(carry: _Carry) -> tuple[_Carry, list[Tensor]]:
    """A copy of ``carry`` made of fresh autograd leaves (floating-point ones require grad) and those leaves."""

    def leaf(tensor: Tensor) -> Tensor:
        return tensor.detach().requires_grad_(tensor.is_floating_point())

    def leaf_states(states: list[RuleState]) -> list[RuleState]:
        return [{k: leaf(v) for k, v in state.items()} for state in states]

    copy_ = _Carry(
        params=[[leaf(p) for p in params] for params in carry.params],
        states=leaf_states(carry.states),
        segment_states=leaf_states(carry.segment_states),
        global_states=leaf_states(carry.global_states),
        subset_state=None if carry.subset_state is None else leaf_states([carry.subset_state])[0],
        buffers=carry.buffers,  # no gradient flows through them
    )
    return copy_, _carry_tensors(copy_)


def check_time_budget(time_budget: float | None) -> None:
    """Raise ValueError unless ``time_budget`` is None or a finite number of seconds >= 0."""
    if time_budget is None:
        return
    # NaN would never stop (every comparison is false); a negative budget stops at once.
    if (
        isinstance(time_budget, bool)
        or not isinstance(time_budget, (int, float))
        or not (math.isfinite(time_budget) and time_budget >= 0)
    ):
        raise ValueError(f"time_budget must be a finite number >= 0 (seconds) or None, got {time_budget!r}")


def _check_checkpoint_dir(checkpoint_dir: object) -> None:
    """Raise unless ``checkpoint_dir`` is a path where a folder is or can be made (checked before
    training, not at the first checkpoint)."""
    if not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(f"checkpoint_dir must be a folder path (str or os.PathLike) or None, got {checkpoint_dir!r}")
    path = Path(checkpoint_dir)
    # The nearest part of the path that exists must be a folder to write into.
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        what = "it" if existing == path else str(existing)
        raise ValueError(f"checkpoint_dir {str(path)!r}: {what} exists and is not a folder; pass a folder path")


def _check_task_data(family: TaskFamily) -> None:
    """A :class:`Task`'s data is checked before any instance is built."""
    if isinstance(family, Task):
        check_task_data(family.data, family.name)


class MetaTrainer:
    """Meta-trains ``rule`` on task families; see :func:`meta_fit` for the arguments."""

    def __init__(
        self,
        rule: UpdateRule,
        tasks: TaskFamily | str | Sequence[TaskFamily | str],
        config: MetaFitConfig | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
        time_budget: float | None = None,
        callback: Callable[[MetaFitHistory], None] | None = None,
    ) -> None:
        if not isinstance(rule, UpdateRule):
            raise TypeError(f"meta_fit expects an UpdateRule as rule, got {type(rule).__name__}")
        if not any(p.requires_grad for p in rule.parameters()):
            raise ValueError("the rule has no trainable parameters")
        check_state_specs(rule)
        if checkpoint_dir is not None:
            _check_checkpoint_dir(checkpoint_dir)
            check_savable(rule)  # now, not at the first checkpoint after minutes of training
        if callback is not None and not callable(callback):
            raise TypeError(
                f"callback must be a function called with the history after each iteration, or None, "
                f"got {type(callback).__name__}"
            )
        self.rule = rule
        if isinstance(tasks, (TaskFamily, str)):
            tasks = [tasks]
        if not isinstance(tasks, Iterable):
            raise TypeError(
                f"tasks must be a TaskFamily/Task, a task name, or a list of them, got {type(tasks).__name__}"
            )
        self.families = [get_task(t) if isinstance(t, str) else t for t in tasks]
        for family in self.families:
            if not isinstance(family, TaskFamily):
                raise TypeError(f"tasks must be TaskFamily/Task objects or task names, got {type(family).__name__}")
            _check_task_data(family)
        if not self.families:
            raise ValueError("meta_fit needs at least one task")
        self.config = config or MetaFitConfig()
        self.config.check()
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.progress = progress
        check_time_budget(time_budget)
        self.time_budget = time_budget
        self.callback = callback
        self.hierarchical = bool(rule.segment_state_spec() or rule.global_state_spec())
        self.meta_optimizer = torch.optim.Adam(rule.parameters(), lr=self.config.meta_lr)
        self.rng = random.Random(self.config.seed)
        self.history = MetaFitHistory()
        self.best_weights = {k: v.detach().clone() for k, v in rule.state_dict().items()}
        self.runs: list[_Run] = []
        for family in self.families:
            probe = sample_instance(family, VALIDATION_SEED_BASE - 1)
            with _global_rng(VALIDATION_SEED_BASE - 1, "meta-fit/probe"):
                validate_instance(
                    probe, f"task {getattr(family, 'name', type(family).__name__)!r}", require_all_used=True
                )

    # ------------------------------------------------------------------ inner problem
    def _new_run(
        self,
        family_index: int | None = None,
        seed: int | None = None,
        horizon: int | None = None,
        lr_scale: float | None = None,
    ) -> _Run:
        if family_index is None:
            family_index = self.rng.randrange(len(self.families))
        if seed is None:
            seed = self.rng.randrange(*TRAIN_SEEDS)
        if horizon is None:
            cfg = self.config
            horizon = _log_uniform_horizon(self.rng, cfg.steps) if cfg.random_horizon else cfg.steps
            if lr_scale is None and self.config.lr_scale_range > 1:
                bound = math.log(self.config.lr_scale_range)
                lr_scale = math.exp(self.rng.uniform(-bound, bound))
        instance = sample_instance(self.families[family_index], seed)
        named = [(n, p) for n, p in instance.model.named_parameters() if p.requires_grad]
        # The model's own dtype (a float64 model gets float64 inputs); the rule computes in
        # its dtype and its update is cast back.
        params = [p.detach().clone() for _, p in named]
        state, segment_state, global_state = self._initial_states(params)
        run = _Run(family_index, seed, horizon, instance, [n for n, _ in named], params, state)
        run.lr_scale = 1.0 if lr_scale is None else float(lr_scale)
        run.segment_state = segment_state
        run.global_state = global_state
        run.buffers = model_buffers(instance.model)
        return run

    def _initial_states(self, params: Sequence[Tensor]) -> tuple[RuleState, RuleState, RuleState]:
        """The rule's starting per-coordinate, per-tensor and global state for a problem of ``params``
        (functions of the rule's weights where it learns them, e.g. HierarchicalRNN's ``log_lr0``)."""
        device = params[0].device
        rows = sum(p.numel() for p in params)
        state = self.rule.init_state(rows, device=device, dtype=torch.float32)
        segment_state = self.rule.init_segment_state(len(params), device=device)
        global_state = self.rule.init_global_state(device=device)
        for method, value, count in (
            ("init_state", state, rows),
            ("init_segment_state", segment_state, len(params)),
            ("init_global_state", global_state, None),
        ):
            checked_initial_state(self.rule, method, value, count, torch.float32)
        return state, segment_state, global_state

    def _next_batch(self, run: _Run) -> Any:
        run.batches_used += 1
        return run.instance.next_batch()

    def _start_unroll(self, runs: Sequence[_Run]) -> tuple[int, _Carry, list[int], Tensor | None]:
        """The length of the next truncation, its starting carry, each run's size and the meta-gradient subset."""
        cfg = self.config
        length = min(cfg.unroll, min(run.horizon - run.steps_done for run in runs))
        carry = _Carry(
            params=[list(run.params) for run in runs],
            states=[run.state for run in runs],
            segment_states=[run.segment_state for run in runs],
            global_states=[run.global_state for run in runs],
            buffers=[run.buffers for run in runs],
        )
        sizes = [_flatten(ps).numel() for ps in carry.params]
        subset = None
        if cfg.meta_grad_fraction < 1 and not self.hierarchical and not getattr(self.rule, "needs_segments", False):
            total = sum(sizes)
            gen = torch.Generator().manual_seed(self.rng.randrange(2**62))
            count = max(1, round(cfg.meta_grad_fraction * total))
            subset = torch.randperm(total, generator=gen)[:count]
            carry.subset_state = {k: torch.cat([s[k] for s in carry.states])[subset] for k in carry.states[0]}
        return length, carry, sizes, subset

    def _finish_unroll(self, runs: Sequence[_Run], length: int, carry: _Carry, last_batches: Sequence[Any]) -> None:
        for i, run in enumerate(runs):
            run.params = [p.detach() for p in carry.params[i]]
            run.state = {k: v.detach() for k, v in carry.states[i].items()}
            run.segment_state = {k: v.detach() for k, v in carry.segment_states[i].items()}
            run.global_state = {k: v.detach() for k, v in carry.global_states[i].items()}
            run.buffers = carry.buffers[i]
            run.steps_done += length
            run.pending_batch = last_batches[i][0]  # measured the last loss; the next truncation's first step

    def _unroll(self, runs: Sequence[_Run]) -> Tensor:
        """Run ``unroll`` steps of every run with autograd to the rule; return the meta-loss."""
        length, carry, sizes, subset = self._start_unroll(runs)
        carry.params = [[p.requires_grad_(True) for p in ps] for ps in carry.params]
        batches = [[self._batch_for_step(run) for run in runs] for _ in range(length + 1)]
        carry, losses = self._unroll_segment(runs, range(length + 1), length, batches, carry, sizes, subset)
        meta_loss = torch.stack([self._truncation_objective(losses[i], run) for i, run in enumerate(runs)]).mean()
        self._finish_unroll(runs, length, carry, batches[-1])
        return meta_loss

    def _unroll_checkpointed(self, runs: Sequence[_Run]) -> float:
        """:meth:`_unroll` and the backward pass of its meta-loss, with gradient checkpointing.

        A forward pass without autograd to the rule keeps only the carry (parameters and rule
        state) at every ``grad_checkpoint_steps``-th step and every loss. The backward pass then
        walks the segments from the last to the first: it recomputes one from its saved carry
        (same batches, same random streams) with autograd, and backpropagates into it the
        meta-loss's dependence on its losses plus the gradient that the later segments sent to
        its final carry. The rule's weights get the same gradient as backpropagating through
        the whole unroll, while at most one segment's activations are alive.

        Returns the meta-loss; the backward pass runs (accumulating into the rule's ``.grad``)
        only when the meta-loss is finite.
        """
        cfg = self.config
        length, carry, sizes, subset = self._start_unroll(runs)
        batches = [[self._batch_for_step(run) for run in runs] for _ in range(length + 1)]
        segments = [
            range(first, min(first + cfg.grad_checkpoint_steps, length + 1))
            for first in range(0, length + 1, cfg.grad_checkpoint_steps)
        ]
        starts: list[_Carry] = []
        pieces: list[list[Tensor]] = []
        with torch.no_grad():
            for steps in segments:
                starts.append(carry)
                carry, losses = self._unroll_segment(
                    runs, steps, length, batches[steps.start : steps.stop], carry, sizes, subset
                )
                pieces.append(losses)
        all_losses = [torch.cat([piece[i] for piece in pieces]) for i in range(len(runs))]
        objectives = [self._truncation_objective(all_losses[i], run) for i, run in enumerate(runs)]
        value = float(torch.stack(objectives).mean())
        if math.isfinite(value):
            self._backward_by_segments(runs, length, batches, segments, starts, pieces, sizes, subset)
        self._finish_unroll(runs, length, carry, batches[-1])
        return value

    def _backward_by_segments(
        self,
        runs: Sequence[_Run],
        length: int,
        batches: Sequence[Sequence[tuple[Any, int]]],
        segments: Sequence[range],
        starts: Sequence[_Carry],
        pieces: Sequence[Sequence[Tensor]],
        sizes: Sequence[int],
        subset: Tensor | None,
    ) -> None:
        """The backward pass of :meth:`_unroll_checkpointed`, one recomputed segment at a time."""
        trainable = [p for p in self.rule.parameters() if p.requires_grad]
        carry_grads: list[Tensor | None] | None = None
        for index in reversed(range(len(segments))):
            steps = segments[index]
            start, leaves = _carry_leaves(starts[index])
            end, losses = self._unroll_segment(
                runs, steps, length, batches[steps.start : steps.stop], start, sizes, subset
            )
            objective = []
            for i, run in enumerate(runs):
                # The other segments' losses enter as constants: the meta-loss is a sum over steps.
                before = [piece[i] for piece in pieces[:index]]
                after = [piece[i] for piece in pieces[index + 1 :]]
                objective.append(self._truncation_objective(torch.cat([*before, losses[i], *after]), run))
            outputs: list[Tensor] = []
            grad_outputs: list[Tensor] = []
            segment_objective = torch.stack(objective).mean()
            if segment_objective.requires_grad:  # not for a segment of step 0 alone (f_0 is no term)
                outputs.append(segment_objective)
                grad_outputs.append(torch.ones_like(segment_objective))
            if carry_grads is not None:
                for tensor, grad in zip(_carry_tensors(end), carry_grads, strict=True):
                    if grad is not None and tensor.requires_grad:
                        outputs.append(tensor)
                        grad_outputs.append(grad)
            if outputs:
                inputs = [*trainable, *(leaf for leaf in leaves if leaf.requires_grad)]
                torch.autograd.backward(outputs, grad_outputs, inputs=inputs)
            carry_grads = [leaf.grad for leaf in leaves]
        # A fresh instance's starting state comes from the rule's learned initial states.
        assert carry_grads is not None  # there is at least one segment
        first = [(t, g) for t, g in zip(_carry_tensors(starts[0]), carry_grads, strict=True) if g is not None]
        first = [(t, g) for t, g in first if t.requires_grad]
        if first:
            tensors, grads = zip(*first, strict=True)
            torch.autograd.backward(list(tensors), list(grads), inputs=trainable)

    def _batch_for_step(self, run: _Run) -> tuple[Any, int]:
        """The batch ``run``'s next step uses and its index (which keys the step's random stream).

        A step's batch stays pending until the step is taken: the last loss of a truncation is
        measured on the batch that the next truncation's first step then uses.
        """
        if run.pending_batch is None:
            run.pending_batch = self._next_batch(run)
        batch = run.pending_batch, run.batches_used
        run.pending_batch = None
        return batch

    def _unroll_segment(
        self,
        runs: Sequence[_Run],
        steps: range,
        length: int,
        batches: Sequence[Sequence[tuple[Any, int]]],
        carry: _Carry,
        sizes: Sequence[int],
        subset: Tensor | None,
    ) -> tuple[_Carry, list[Tensor]]:
        """Steps ``steps`` of the unroll from ``carry``: the new carry and each run's meta-loss terms.

        Step ``length`` only measures the loss (its batch is left pending for the next truncation).
        Reads ``runs`` but changes nothing in them besides a first ``initial_loss``, so that it
        can be recomputed for the backward pass.
        """
        cfg = self.config
        params, states = list(carry.params), list(carry.states)
        segment_states, global_states = list(carry.segment_states), list(carry.global_states)
        buffers = list(carry.buffers)
        subset_state = carry.subset_state
        terms: list[list[Tensor]] = [[] for _ in runs]
        layout = None
        if self.hierarchical and not self.rule.forward_reads_global_state:
            layout = _RunsLayout.of(params)
        for t, step_batches in zip(steps, batches, strict=True):
            grads = []
            for i, run in enumerate(runs):
                batch, index = step_batches[i]
                if not torch.is_grad_enabled():
                    # The forward pass of _unroll_checkpointed: the optimizee's gradient still needs autograd.
                    params[i] = [p.detach().requires_grad_(True) for p in params[i]]
                # A copy for the forward pass to update (BatchNorm's statistics); kept only
                # for a step that is taken, not for the loss measured after the last one.
                step_buffers = copy_buffers(buffers[i])
                with _global_rng(run.seed, f"meta-fit/batch/{index}"), torch.enable_grad():
                    if t == length and cfg.meta_loss == "final":
                        loss = _end_of_run_loss(run.instance, run.names, params[i], batch, step_buffers)
                    else:
                        loss = functional_loss(run.instance, run.names, params[i], batch, step_buffers)
                if math.isnan(run.initial_loss):
                    run.initial_loss = max(float(loss.detach()), 1e-12)
                if t > 0:
                    terms[i].append(loss if torch.is_grad_enabled() else loss.detach())
                if t == length:
                    continue
                buffers[i] = step_buffers
                # retain_graph: the same loss is also a term of the meta-loss.
                with torch.enable_grad():
                    g = _optimizee_grads(
                        loss, params[i], run.instance.name, run.names, retain_graph=True, create_graph=cfg.second_order
                    )
                grads.append(_flatten(g) if cfg.second_order else _flatten(g).detach())
            if t == length:
                break
            if layout is not None:
                # All runs in one rule call; each keeps its own tensor-level and global state.
                scales = None
                if self.rule.needs_step_scales:
                    lrs = [run.lr_scale for run, tensors in zip(runs, params, strict=True) for _ in tensors]
                    scales = step_scales([p for tensors in params for p in tensors], lrs)
                update, new_state, segment_state, global_state = self.rule.full_step(
                    torch.cat(grads),
                    {k: torch.cat([st[k] for st in states]) for k in states[0]},
                    layout.ids,
                    layout.count,
                    {k: torch.cat([st[k] for st in segment_states]) for k in segment_states[0]},
                    {k: torch.stack([st[k] for st in global_states]) for k in global_states[0]},
                    scales,
                    groups=layout.groups,
                    num_groups=len(runs),
                )
                first = 0
                for i, tensors in enumerate(layout.tensors_per_run):
                    segment_states[i] = {k: v[first : first + tensors] for k, v in segment_state.items()}
                    global_states[i] = {k: v[i] for k, v in global_state.items()}
                    first += tensors
            elif self.hierarchical:
                # A rule whose forward reads the global state: one rule call per run.
                parts = []
                for i in range(len(runs)):
                    scales = step_scales(params[i], runs[i].lr_scale) if self.rule.needs_step_scales else None
                    upd, states[i], segment_states[i], global_states[i] = self.rule.full_step(
                        grads[i], states[i], *_segment_ids(params[i]), segment_states[i], global_states[i], scales
                    )
                    parts.append(upd)
                update = torch.cat(parts)
                new_state = {k: torch.cat([st[k] for st in states]) for k in states[0]}
            else:
                flat_grad = torch.cat(grads)
                flat_state = {k: torch.cat([s[k] for s in states]) for k in states[0]}
                context = None
                if getattr(self.rule, "needs_segments", False):
                    context = _segments_for(params)
                if subset is None:
                    update, new_state = check_rule_output(
                        self.rule, flat_grad, flat_state, self.rule(flat_grad, flat_state, context)
                    )
                else:
                    update, new_state, subset_state = self._subset_step(flat_grad, flat_state, subset, subset_state)
            offset = 0
            for i in range(len(runs)):
                upd = update[offset : offset + sizes[i]]
                if runs[i].lr_scale != 1.0:
                    upd = upd * runs[i].lr_scale
                states[i] = {k: v[offset : offset + sizes[i]] for k, v in new_state.items()}
                pos = 0
                new_params = []
                for p in params[i]:
                    new_params.append(p + upd[pos : pos + p.numel()].view_as(p).to(p.dtype))
                    pos += p.numel()
                params[i] = new_params
                offset += sizes[i]
        losses = [torch.stack(ts) if ts else params[i][0].new_zeros(0) for i, ts in enumerate(terms)]
        return _Carry(params, states, segment_states, global_states, subset_state, buffers), losses

    def _truncation_objective(self, losses: Tensor, run: _Run) -> Tensor:
        """The meta-loss of one truncation of ``run`` from its losses after each of its steps."""
        return _objective(losses, run.initial_loss, run.steps_done + 1, run.horizon, self.config)

    # ------------------------------------------------------------------ PES
    def _trainable(self) -> list[Tensor]:
        return [p for p in self.rule.parameters() if p.requires_grad]

    def _start_particles(self, run: _Run, theta: Tensor, noise: Tensor) -> None:
        """The +/- perturbed trajectories of ``run`` (pair ``j``: weights ``theta ± noise[j]``).

        At an instance's start each particle's rule state is built from its own perturbed
        weights: a rule's learned initial state (e.g. HierarchicalRNN's ``log_lr0``, ``*_h0``)
        is then part of what the perturbations explore, as it is of what backpropagation sees.
        """

        def copy(states: RuleState) -> RuleState:
            return {k: v.detach().clone() for k, v in states.items()}

        trainable = self._trainable()
        run.particles = []
        try:
            for j in range(self.config.pes_pairs):
                for sign in (1.0, -1.0):
                    states = (run.state, run.segment_state, run.global_state)
                    if run.steps_done == 0:
                        _assign(trainable, theta + sign * noise[j])
                        with torch.no_grad():
                            states = self._initial_states(run.params)
                    particle = _Particle([p.detach().clone() for p in run.params], *map(copy, states))
                    particle.buffers = copy_buffers(run.buffers)
                    run.particles.append(particle)
        finally:
            _assign(trainable, theta)
        run.pes_noise = theta.new_zeros(self.config.pes_pairs, theta.numel())

    def _particle_unroll(self, run: _Run, particle: _Particle, batches: Sequence[Any], first_batch: int) -> Tensor:
        """Advance ``particle`` over ``batches[:-1]`` (forward only for the rule).

        ``first_batch`` is the index of ``batches[0]`` in the instance's stream. Returns the
        losses after each step: on ``batches[1:]``, the last one evaluated only.
        """
        segments = _Segments.of(self.rule, particle.params)
        losses = []
        for t, batch in enumerate(batches[:-1]):
            with _global_rng(run.seed, f"meta-fit/batch/{first_batch + t}"):
                loss = _learned_step(self.rule, run.instance, run.names, particle, batch, segments, run.lr_scale)
            if t > 0:
                losses.append(loss)
        last = _end_of_run_loss if self.config.meta_loss == "final" else functional_loss
        with torch.no_grad(), _global_rng(run.seed, f"meta-fit/batch/{first_batch + len(batches) - 1}"):
            losses.append(last(run.instance, run.names, particle.params, batches[-1], copy_buffers(particle.buffers)))
        return torch.stack(losses)

    def _pes_estimate(self, runs: Sequence[_Run]) -> tuple[float, Tensor]:
        """One truncation of every run by persistent evolution strategies.

        Returns the mean meta-loss of all perturbed trajectories and the flat meta-gradient
        estimate (NaN where no run gave a finite one). Runs whose trajectories diverged are
        marked finished. Pair ``j`` runs the rule's weights ``θ ± ε_j``; with ``ξ_j`` the sum of
        its ``ε_j`` over the instance's truncations, the estimate is
        ``Σ_j ξ_j (L⁺_j − L⁻_j) / (2 N σ²)``.
        """
        cfg = self.config
        trainable = self._trainable()
        theta = torch.nn.utils.parameters_to_vector(trainable).detach().clone()
        length = min(cfg.unroll, min(run.horizon - run.steps_done for run in runs))
        estimates, values = [], []
        try:
            for run in runs:
                # Common random numbers: every particle of an instance sees the same minibatches.
                if run.pending_batch is None:
                    run.pending_batch = self._next_batch(run)
                batches = [run.pending_batch] + [self._next_batch(run) for _ in range(length)]
                run.pending_batch = batches[-1]
                first_batch = run.batches_used - length  # stream index of batches[0]
                if math.isnan(run.initial_loss):
                    start = run.particles[0].params if run.particles else run.params
                    with torch.no_grad(), _global_rng(run.seed, f"meta-fit/batch/{first_batch}"):
                        first = functional_loss(run.instance, run.names, start, batches[0], copy_buffers(run.buffers))
                    run.initial_loss = max(float(first), 1e-12)
                gen = torch.Generator().manual_seed(self.rng.randrange(2**62))
                noise = torch.randn(cfg.pes_pairs, theta.numel(), generator=gen, dtype=theta.dtype) * cfg.pes_std
                if run.particles is None:
                    self._start_particles(run, theta, noise)
                run.pes_noise += noise
                objectives = torch.empty(cfg.pes_pairs, 2)
                for j in range(cfg.pes_pairs):
                    for side, sign in enumerate((1.0, -1.0)):
                        _assign(trainable, theta + sign * noise[j])
                        losses = self._particle_unroll(run, run.particles[2 * j + side], batches, first_batch)
                        objectives[j, side] = self._truncation_objective(losses, run)
                run.steps_done += length
                if not torch.isfinite(objectives).all():
                    run.steps_done = run.horizon  # diverged: start a fresh instance
                    continue
                difference = objectives[:, 0] - objectives[:, 1]
                estimates.append((run.pes_noise * difference[:, None]).sum(0) / (2 * cfg.pes_pairs * cfg.pes_std**2))
                values.append(float(objectives.mean()))
        finally:
            _assign(trainable, theta)
        if not estimates:
            return float("nan"), torch.full_like(theta, float("nan"))
        return sum(values) / len(values), torch.stack(estimates).mean(0)

    def _subset_step(
        self, grad: Tensor, state: RuleState, subset: Tensor, subset_state: RuleState
    ) -> tuple[Tensor, RuleState, RuleState]:
        """Rule step with autograd through ``subset`` only, its gradient scaled by ``n / |subset|``.

        Coordinates do not interact through a coordinatewise rule, so the other coordinates'
        trajectories are evaluated exactly under ``no_grad`` and only the meta-gradient is sampled.
        """
        with torch.no_grad():
            detached = {k: v.detach() for k, v in state.items()}
            update_all, state_all = check_rule_output(self.rule, grad, detached, self.rule(grad, detached))
        update_sub, new_subset_state = check_rule_output(
            self.rule, grad[subset], subset_state, self.rule(grad[subset], subset_state)
        )
        scale = grad.numel() / subset.numel()
        # Same value as update_sub; gradient multiplied by `scale`.
        scaled = update_sub.detach() + (update_sub - update_sub.detach()) * scale
        update = update_all.index_put((subset,), scaled)
        return update, state_all, new_subset_state

    # ------------------------------------------------------------------ outer loop
    def meta_lr_at(self, iteration: int) -> float:
        """The meta learning rate of meta-iteration ``iteration`` (a function of it alone, so resume is exact)."""
        cfg = self.config
        if cfg.meta_lr_schedule == "constant":
            return cfg.meta_lr
        progress = min(iteration / max(cfg.meta_iterations, 1), 1.0)
        floor = 0.05
        return cfg.meta_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    def step(self) -> float:
        """One meta-iteration; returns the meta-loss (NaN if the update was skipped)."""
        cfg = self.config
        for group in self.meta_optimizer.param_groups:
            group["lr"] = self.meta_lr_at(self.history.iteration)
        while len(self.runs) < cfg.instances:
            self.runs.append(self._new_run())
        self.meta_optimizer.zero_grad(set_to_none=True)
        if cfg.estimator == "pes":
            value, estimate = self._pes_estimate(self.runs)
            ok = math.isfinite(value)
            if ok:
                offset = 0
                for p in self._trainable():
                    p.grad = estimate[offset : offset + p.numel()].view_as(p).to(p.dtype).clone()
                    offset += p.numel()
        else:
            if cfg.grad_checkpoint_steps > 0:
                value = self._unroll_checkpointed(self.runs)  # backward included
                ok = math.isfinite(value)
            else:
                meta_loss = self._unroll(self.runs)
                value = float(meta_loss.detach())
                ok = math.isfinite(value)
                if ok:
                    meta_loss.backward()
        if ok:
            grads = [p.grad for p in self.rule.parameters() if p.grad is not None]
            if not grads:
                raise ValueError(
                    f"meta_fit: no trainable weight of {type(self.rule).__name__} got a meta-gradient: its "
                    "updates do not depend on them through autograd (a .item(), .detach() or torch.no_grad() "
                    "in forward, or weights forward does not use)"
                )
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            ok = bool(torch.isfinite(total))
            if ok and cfg.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.rule.parameters(), cfg.clip_grad_norm)
        if ok:
            self.meta_optimizer.step()
        else:
            value = math.nan  # also when only the meta-gradient was non-finite: nothing was learned from it
            self.history.skipped_updates += 1
            self.meta_optimizer.zero_grad(set_to_none=True)
            # A diverged trajectory is dropped: its parameters may already be non-finite.
            self.runs = [r for r in self.runs if all(torch.isfinite(p).all() for p in r.params)]
        self.runs = [r for r in self.runs if r.steps_done < r.horizon]
        self.history.iteration += 1
        self.history.meta_losses.append(value)
        return value

    @torch.no_grad()
    def validate(self) -> float:
        """Mean meta-objective of the current rule over held-out instances (full horizon), each
        run once per multiplier of ``validation_lr_scales``."""
        cfg = self.config
        scores = []
        horizon = cfg.validation_steps or cfg.steps
        # The "final" meta-loss is this score up to a constant per instance (f_0 is a minibatch's).
        final = cfg.validation_metric == "final" or cfg.meta_loss == "final"
        for i in range(cfg.validation_instances):
            family_index = i % len(self.families)
            for lr_scale in cfg.validation_lr_scales:
                run = self._new_run(family_index, VALIDATION_SEED_BASE + i, horizon)
                with _global_rng(run.seed, "meta-fit/validation"):
                    losses, names, start, end = _rollout(self.rule, run.instance, horizon, float(lr_scale))
                    if final:
                        losses = [_whole_split_loss(run.instance, names, *model) for model in (start, end)]
                trace = torch.tensor(losses)
                if not torch.isfinite(trace).all():  # the first loss too: a NaN f_0 would score NaN
                    scores.append(float("inf"))
                elif final:
                    scores.append(float(_log_ratio(trace[1], max(losses[0], 1e-12), 0.0)))
                else:
                    scores.append(float(_objective(trace[1:], max(losses[0], 1e-12), 1, horizon, cfg)))
        return float(sum(scores) / len(scores))

    def _record_validation(self, iteration: int) -> None:
        score = self.validate()
        self.history.validation.append((iteration, score))
        if score < self.history.best_validation:
            self.history.best_validation = score
            self.history.best_iteration = iteration
            self.best_weights = {k: v.detach().clone() for k, v in self.rule.state_dict().items()}

    def run(self) -> UpdateRule:
        """Meta-train until ``meta_iterations`` (or the time budget); returns the best rule."""
        cfg = self.config
        start = time.perf_counter() - self.history.seconds
        first_iteration, skipped_before = self.history.iteration, self.history.skipped_updates
        bar = _progress_bar(cfg.meta_iterations, self.history.iteration, self.progress)
        try:
            if cfg.validate_every and self.history.iteration == 0 and not self.history.validation:
                # The starting rule is a candidate too: a run that only makes it worse returns it.
                self._record_validation(0)
            while self.history.iteration < cfg.meta_iterations:
                if self.time_budget is not None and self.history.seconds > self.time_budget:
                    break  # a resumed run whose budget (counted over all sessions) is already spent
                value = self.step()
                it = self.history.iteration
                self.history.seconds = time.perf_counter() - start
                if cfg.validate_every and (it % cfg.validate_every == 0 or it == cfg.meta_iterations):
                    self._record_validation(it)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        meta_loss=f"{value:.4f}",
                        best_val=f"{self.history.best_validation:.4f}",
                        skipped=self.history.skipped_updates,
                    )
                checkpoint_due = it % cfg.checkpoint_every == 0 or it == cfg.meta_iterations
                if self.checkpoint_dir is not None and checkpoint_due:
                    self.save_checkpoint(self.checkpoint_dir)
                if self.callback is not None:
                    self.callback(self.history)
                if self.time_budget is not None and self.history.seconds > self.time_budget:
                    # Stopping early: checkpoint here so that a resume loses nothing.
                    if self.checkpoint_dir is not None and not checkpoint_due:
                        self.save_checkpoint(self.checkpoint_dir)
                    break
        finally:
            if bar is not None:
                bar.close()
            self.history.seconds = time.perf_counter() - start
        ran = self.history.iteration - first_iteration
        if ran > 0 and self.history.skipped_updates - skipped_before == ran:
            warnings.warn(
                f"meta_fit: all {ran} meta-gradient updates were skipped (non-finite meta-loss or "
                "meta-gradient): the rule's weights did not change. Check the task's loss, or lower meta_lr",
                RuntimeWarning,
                stacklevel=3,  # the caller of meta_fit
            )
        if cfg.validate_every and self.history.best_iteration >= 0:
            self.rule.load_state_dict(self.best_weights)
        return self.rule

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: str | os.PathLike[str]) -> None:
        """Write everything needed to continue exactly: rule, meta-optimizer, runs, RNG."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        for k, v in self.rule.state_dict().items():
            tensors[f"rule/{k}"] = v.detach().contiguous()
        for k, v in self.best_weights.items():
            tensors[f"best/{k}"] = v.contiguous()
        for index, p in enumerate(self.rule.parameters()):
            st = self.meta_optimizer.state.get(p, {})
            for key, value in st.items():
                tensors[f"meta_opt/{index}/{key}"] = torch.as_tensor(value).detach().clone().contiguous()
        runs_meta = []
        for r_index, run in enumerate(self.runs):
            for p_index, p in enumerate(run.params):
                tensors[f"run/{r_index}/param/{p_index}"] = p.contiguous()
            for k, v in run.state.items():
                tensors[f"run/{r_index}/state/{k}"] = v.detach().contiguous()
            for k, v in run.segment_state.items():
                tensors[f"run/{r_index}/segment/{k}"] = v.detach().contiguous()
            for k, v in run.global_state.items():
                tensors[f"run/{r_index}/global/{k}"] = v.detach().contiguous()
            for k, v in run.buffers.items():
                tensors[f"run/{r_index}/buffer/{k}"] = v.detach().contiguous()
            if run.particles is not None:
                tensors[f"run/{r_index}/pes_noise"] = run.pes_noise.contiguous()
                for k_index, particle in enumerate(run.particles):
                    prefix = f"run/{r_index}/particle/{k_index}"
                    for p_index, p in enumerate(particle.params):
                        tensors[f"{prefix}/param/{p_index}"] = p.contiguous()
                    for kind, states in (
                        ("state", particle.state),
                        ("segment", particle.segment_state),
                        ("global", particle.global_state),
                        ("buffer", particle.buffers),
                    ):
                        for k, v in states.items():
                            tensors[f"{prefix}/{kind}/{k}"] = v.detach().contiguous()
            runs_meta.append(
                {
                    "family_index": run.family_index,
                    "seed": run.seed,
                    "horizon": run.horizon,
                    "steps_done": run.steps_done,
                    "batches_used": run.batches_used,
                    "initial_loss": run.initial_loss,
                    "has_pending_batch": run.pending_batch is not None,
                    "lr_scale": run.lr_scale,
                    "particles": 0 if run.particles is None else len(run.particles),
                }
            )
        # Each save gets its own weights file, named in the JSON: replacing the JSON (one
        # atomic rename) switches to the new checkpoint, so a kill at any moment leaves the
        # old or the new pair whole, never new weights beside old bookkeeping.
        weights_name = f"checkpoint-{secrets.token_hex(8)}.safetensors"
        payload = serialize_tensors(tensors)
        meta = {
            "weights": weights_name,
            # Resume refuses weights that are not these bytes (a disk that zeroed or cut them).
            "weights_sha256": hashlib.sha256(payload).hexdigest(),
            "rule_type": self.rule.rule_type,
            "rule_config": self.rule.config,
            "trained_parameters": self._trained_names(),
            "tasks": self._task_labels(),
            "config": asdict(self.config),
            "history": asdict(self.history),
            "rng_state": _rng_to_json(self.rng.getstate()),
            "runs": runs_meta,
        }
        # Serialised in memory and written by us: safetensors' save_file creates 0600 files, which
        # others cannot read in a shared run folder; write_bytes lets the umask decide.
        (directory / weights_name).write_bytes(payload)
        write_files(directory, {"checkpoint.json": json.dumps(meta).encode()})
        # Only now are the weights files of earlier checkpoints unreferenced.
        for stale in directory.glob("checkpoint*.safetensors*"):
            if stale.name != weights_name:
                stale.unlink(missing_ok=True)
        save_pretrained(self.rule, directory / "last")
        if self.config.validate_every and self.history.best_iteration >= 0:
            # The best validated weights so far, loadable while the run goes on.
            best = copy.deepcopy(self.rule)
            best.load_state_dict(self.best_weights)
            save_pretrained(best, directory / "best")
        elif (directory / "best").is_dir():
            # An earlier run's (a fresh run into a used folder): beside this run's checkpoint it
            # would pass for this run's best weights.
            shutil.rmtree(directory / "best")

    def _trained_names(self) -> list[str]:
        """Names of the rule's parameters that meta-training updates (``requires_grad``)."""
        return [name for name, p in self.rule.named_parameters() if p.requires_grad]

    def _task_labels(self) -> list[str]:
        return [getattr(f, "name", type(f).__name__) for f in self.families]

    def load_checkpoint(self, directory: str | os.PathLike[str]) -> None:
        """Continue from :meth:`save_checkpoint`'s files (the rule, tasks and settings must match).

        A checkpoint that cannot be read raises ``ValueError`` naming it; nothing is changed then
        except what was already loaded (start over with ``resume=False``; ``--overwrite`` on the
        command line).
        """
        directory = Path(directory)
        meta_path = directory / "checkpoint.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: no checkpoint to resume from")
        try:
            self._load_checkpoint(directory, meta_path)
        except _UNREADABLE_CHECKPOINT as err:
            raise ValueError(
                f"{directory}: the checkpoint is corrupt or from another version/rule "
                f"({type(err).__name__}: {err}); start over without resuming (--overwrite)"
            ) from err

    def _load_checkpoint(self, directory: Path, meta_path: Path) -> None:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):
            raise TypeError(f"checkpoint.json holds a {type(meta).__name__}, not an object")
        if meta["rule_type"] != self.rule.rule_type or meta["rule_config"] != self.rule.config:
            raise ValueError(
                f"{meta_path}: checkpoint is for rule {meta['rule_type']} {meta['rule_config']}, "
                f"not {self.rule.rule_type} {self.rule.config}"
            )
        trained = meta.get("trained_parameters")  # absent in checkpoints written before it was recorded
        if trained is not None and trained != self._trained_names():
            raise ValueError(
                f"{meta_path}: the checkpoint meta-trained the rule parameters {trained}, but this rule "
                f"trains {self._trained_names()}; resume with the same ones trainable (--train-only, "
                "requires_grad), or start over without resuming (--overwrite)"
            )
        saved_cfg = meta["config"]
        # As JSON holds them (tuples come back as lists).
        ours = json.loads(json.dumps(asdict(self.config)))
        defaults = json.loads(json.dumps(asdict(MetaFitConfig())))
        # Settings added after a checkpoint was written count as their defaults.
        # Free to change on resume: the run's length, and gradient checkpointing (the same
        # meta-gradient with less memory, e.g. after running out of it).
        free = {"meta_iterations", "grad_checkpoint_steps"}
        differing = {k for k in ours if k not in free and saved_cfg.get(k, defaults[k]) != ours[k]}
        if differing:
            raise ValueError(f"{meta_path}: meta-training settings differ from the checkpoint's: {sorted(differing)}")
        saved_tasks = meta.get("tasks")  # absent in checkpoints written before it was recorded
        if saved_tasks is not None and saved_tasks != self._task_labels():
            raise ValueError(f"{meta_path}: checkpoint is for tasks {saved_tasks}, not {self._task_labels()}")
        # Checkpoints written before each save had its own weights file used this name.
        weights_name = meta.get("weights", "checkpoint.safetensors")
        if not isinstance(weights_name, str) or not weights_name or Path(weights_name).name != weights_name:
            raise TypeError(f"checkpoint.json names the weights file {weights_name!r}")
        # Copies: safetensors' tensors need not be 64-byte aligned, and vectorised kernels can
        # round differently on unaligned memory (a resumed run would then drift by ~1e-8).
        payload = (directory / weights_name).read_bytes()
        expected_hash = meta.get("weights_sha256")  # absent in checkpoints written before it was recorded
        if expected_hash is not None and hashlib.sha256(payload).hexdigest() != expected_hash:
            raise ValueError(
                f"{directory / weights_name}: not the bytes checkpoint.json was saved with (its sha256 "
                "differs): the weights file was damaged or replaced; start over without resuming (--overwrite)"
            )
        tensors = {k: v.clone() for k, v in deserialize_tensors(payload).items()}
        # Everything checked before anything is loaded.
        _check_checkpoint_fields(meta, len(self.families), self.config.steps)
        rule_weights = {k[5:]: v for k, v in tensors.items() if k.startswith("rule/")}
        best_weights = {k[5:]: v for k, v in tensors.items() if k.startswith("best/")}
        _check_checkpoint_weights(self.rule, rule_weights, "rule")
        if best_weights:  # none before the first validation
            _check_checkpoint_weights(self.rule, best_weights, "best")
        meta_state = {}
        for index, p in enumerate(self.rule.parameters()):
            prefix = f"meta_opt/{index}/"
            st = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            for key, value in st.items():
                expected = () if key == "step" else tuple(p.shape)
                if tuple(value.shape) != expected or not torch.isfinite(value).all():
                    raise TypeError(f"meta_opt/{index}/{key} is {tuple(value.shape)}, expected finite {expected}")
            if st:
                meta_state[p] = st
        done = meta["history"].get("iteration", 0)
        if done > self.config.meta_iterations:
            raise ValueError(
                f"{meta_path}: the checkpoint is at meta-iteration {done}, past meta_iterations="
                f"{self.config.meta_iterations}; resume with meta_iterations >= {done}, or load its best "
                f"weights from {directory / 'best'}"
            )
        rng_state = _rng_from_json(meta["rng_state"])
        self.rule.load_state_dict(rule_weights)
        self.best_weights = best_weights
        for p, st in meta_state.items():
            self.meta_optimizer.state[p] = st
        history = meta["history"]
        history["validation"] = [tuple(v) for v in history["validation"]]
        self.history = MetaFitHistory(**history)
        self.rng.setstate(rng_state)
        self.runs = []
        for r_index, info in enumerate(meta["runs"]):
            run = self._new_run(info["family_index"], info["seed"], info["horizon"], info.get("lr_scale", 1.0))
            # Replay the instance's data stream to where it was; the pending batch (if
            # any) is the last one drawn.
            batch = None
            for _ in range(info["batches_used"]):
                batch = run.instance.next_batch()
            run.batches_used = info["batches_used"]
            run.steps_done = info["steps_done"]
            run.initial_loss = info["initial_loss"]
            if info["has_pending_batch"]:
                run.pending_batch = batch
            saved = functools.partial(_saved_like, tensors, f"run/{r_index}", run.instance.name, meta_path)
            run.params = [saved(f"param/{i}", p) for i, p in enumerate(run.params)]
            if f"run/{r_index}/param/{len(run.params)}" in tensors:
                raise ValueError(
                    f"{meta_path}: the checkpoint's run {r_index} has more parameter tensors than task "
                    f"{run.instance.name!r}'s model now has: {_MODEL_CHANGED}"
                )
            run.state = {k: saved(f"state/{k}", v) for k, v in run.state.items()}
            run.segment_state = {k: saved(f"segment/{k}", v) for k, v in run.segment_state.items()}
            run.global_state = {k: saved(f"global/{k}", v) for k, v in run.global_state.items()}
            # Checkpoints written before buffers were carried have none: the model's own.
            run.buffers = {
                k: saved(f"buffer/{k}", v) if f"run/{r_index}/buffer/{k}" in tensors else v
                for k, v in run.buffers.items()
            }
            if info.get("particles", 0):
                run.pes_noise = tensors[f"run/{r_index}/pes_noise"]
                trainable = sum(p.numel() for p in self._trainable())
                if run.pes_noise.shape[-1] != trainable:  # an older checkpoint has no trained_parameters
                    raise ValueError(
                        f"{meta_path}: the checkpoint's perturbations are over {run.pes_noise.shape[-1]} rule "
                        f"weights, but this rule trains {trainable}: resume with the same parameters "
                        "trainable (--train-only, requires_grad), or start over without resuming (--overwrite)"
                    )
                run.particles = []
                for k_index in range(info["particles"]):
                    prefix = f"run/{r_index}/particle/{k_index}"
                    run.particles.append(
                        _Particle(
                            [tensors[f"{prefix}/param/{i}"] for i in range(len(run.params))],
                            {k: tensors[f"{prefix}/state/{k}"] for k in run.state},
                            {k: tensors[f"{prefix}/segment/{k}"] for k in run.segment_state},
                            {k: tensors[f"{prefix}/global/{k}"] for k in run.global_state},
                            {k: tensors.get(f"{prefix}/buffer/{k}", v) for k, v in run.buffers.items()},
                        )
                    )
            self.runs.append(run)


_MODEL_CHANGED = "the task's model changed since the checkpoint; start over without resuming (--overwrite)"


def _saved_like(tensors: dict[str, Tensor], prefix: str, task: str, meta_path: Path, key: str, fresh: Tensor) -> Tensor:
    """The checkpoint's ``prefix/key``, if shaped like ``fresh`` (a fresh instance's tensor).

    Without the check a model changed since the checkpoint would go on training the old
    model's parameters in the runs that were under way.
    """
    value = tensors[f"{prefix}/{key}"]
    if value.shape != fresh.shape or value.dtype != fresh.dtype:
        raise ValueError(
            f"{meta_path}: the checkpoint's {prefix}/{key} is {value.dtype} {tuple(value.shape)}, but task "
            f"{task!r} now gives {fresh.dtype} {tuple(fresh.shape)}: {_MODEL_CHANGED}"
        )
    return value


def model_buffers(model: torch.nn.Module) -> dict[str, Tensor]:
    """Copies of ``model``'s buffers (e.g. BatchNorm's running statistics), by name."""
    return {name: buffer.detach().clone() for name, buffer in model.named_buffers()}


def copy_buffers(buffers: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copies of ``buffers``, for a forward pass to update in place."""
    return {name: buffer.clone() for name, buffer in buffers.items()}


def functional_loss(
    instance: TaskInstance,
    names: Sequence[str],
    params: Sequence[Tensor],
    batch: Any,
    buffers: dict[str, Tensor] | None = None,
) -> Tensor:
    """The instance's loss on ``batch`` with its model's parameters replaced by ``params``.

    ``buffers``: tensors that stand in for the model's buffers, updated in place where the
    model updates its own (BatchNorm's running statistics in training mode); without them the
    model's own buffers are used and updated.
    """
    inputs, targets = batch
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    tensors = dict(zip(names, params, strict=True))
    if buffers:
        tensors.update(buffers)
    output = functional_call(instance.model, tensors, args)
    value = instance.loss(output, targets)
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise ValueError(f"task {instance.name!r}: loss must return a scalar tensor")
    return value.reshape(())


def _end_of_run_loss(
    instance: TaskInstance,
    names: Sequence[str],
    params: Sequence[Tensor],
    batch: Any,
    buffers: dict[str, Tensor] | None = None,
) -> Tensor:
    """The loss on the instance's whole training split (on ``batch`` when it has none), with
    the model in eval mode as :mod:`learned_optim.compare` scores the final training loss."""
    model = instance.model
    was_training = model.training
    model.eval()
    try:
        data = instance.train_set if instance.train_set is not None else batch
        return functional_loss(instance, names, params, data, buffers)
    finally:
        model.train(was_training)


@torch.no_grad()
def _whole_split_loss(
    instance: TaskInstance, names: Sequence[str], params: Sequence[Tensor], buffers: dict[str, Tensor]
) -> float:
    """:func:`_end_of_run_loss` (the next minibatch standing in for a missing split), as a float."""
    batch = instance.next_batch() if instance.train_set is None else None
    return float(_end_of_run_loss(instance, names, params, batch, copy_buffers(buffers)))


@torch.no_grad()
def _assign(params: Sequence[Tensor], flat: Tensor) -> None:
    """Copy ``flat`` into ``params`` in place (their storage, and so any optimizer state keys, stay)."""
    offset = 0
    for p in params:
        p.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def _segment_ids(params: Sequence[Tensor]) -> tuple[Tensor, int]:
    """Segment id of every coordinate of ``params`` (one segment per tensor) and their number."""
    lengths = torch.tensor([p.numel() for p in params])
    ids = torch.repeat_interleave(torch.arange(len(params)), lengths)
    return ids.to(params[0].device), len(params)


@dataclass
class _RunsLayout:
    """Tensor membership of several runs' coordinates, concatenated run after run."""

    ids: Tensor  # tensor of every coordinate, numbered across runs
    count: int  # tensors of all runs
    groups: Tensor  # run of every tensor
    tensors_per_run: list[int]

    @classmethod
    def of(cls, params: Sequence[Sequence[Tensor]]) -> _RunsLayout:
        tensors_per_run = [len(ps) for ps in params]
        lengths = torch.tensor([p.numel() for ps in params for p in ps])
        count = len(lengths)
        device = params[0][0].device
        ids = torch.repeat_interleave(torch.arange(count), lengths).to(device)
        groups = torch.repeat_interleave(torch.arange(len(params)), torch.tensor(tensors_per_run)).to(device)
        return cls(ids, count, groups, tensors_per_run)


def _segments_for(params: Sequence[Sequence[Tensor]]) -> StepContext:
    layout = _RunsLayout.of(params)
    return StepContext(segment_ids=layout.ids, num_segments=layout.count)


def _rng_to_json(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


def _rng_from_json(state: list) -> tuple:
    try:
        rng = random.Random()
        rng.setstate((state[0], tuple(state[1]), state[2]))
    except (ValueError, TypeError, IndexError, OverflowError) as err:
        raise TypeError(f"rng_state is not a random.Random state ({err})") from None
    return rng.getstate()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_HISTORY_FIELDS = {
    "iteration": _is_int,
    "meta_losses": lambda v: isinstance(v, list) and all(_is_number(x) for x in v),
    "validation": lambda v: (
        isinstance(v, list)
        and all(isinstance(x, list) and len(x) == 2 and _is_int(x[0]) and _is_number(x[1]) for x in v)
    ),
    "best_validation": _is_number,
    "best_iteration": _is_int,
    "skipped_updates": _is_int,
    "seconds": _is_number,
}
_RUN_FIELDS = {
    "family_index": _is_int,
    "seed": _is_int,
    "horizon": _is_int,
    "steps_done": _is_int,
    "batches_used": _is_int,
    "initial_loss": _is_number,
    "has_pending_batch": lambda v: isinstance(v, bool),
    "lr_scale": _is_number,
    "particles": _is_int,
}
_OPTIONAL_RUN_FIELDS = {"lr_scale", "particles"}  # absent in checkpoints written before them


def _check_checkpoint_weights(rule: UpdateRule, weights: dict[str, Tensor], label: str) -> None:
    """``TypeError`` unless ``weights`` are finite and shaped as ``rule``'s state_dict."""
    expected = {k: tuple(v.shape) for k, v in rule.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if got != expected:
        raise TypeError(f"the {label} weights are {got}, expected {expected}")
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TypeError(f"the {label} weights {bad} hold non-finite values")


def _check_checkpoint_fields(meta: dict[str, Any], families: int, steps: int) -> None:
    """``TypeError`` naming the first field of checkpoint.json's bookkeeping that is not as written
    (``steps``: the run's ``MetaFitConfig.steps``, which bounds its instances' horizons)."""
    history = meta["history"]
    # Fields added later are absent from older checkpoints and take their defaults.
    if not isinstance(history, dict) or not set(history) <= set(_HISTORY_FIELDS):
        raise TypeError(f"history must be an object with fields among {sorted(_HISTORY_FIELDS)}")
    for name, valid in _HISTORY_FIELDS.items():
        if name in history and not valid(history[name]):
            raise TypeError(f"history.{name} is {history[name]!r}")
    ranges = {
        "iteration": lambda v: v >= 0,
        "best_iteration": lambda v: v >= -1,
        "best_validation": lambda v: not math.isnan(v) and v > -math.inf,  # inf until the first validation
        "skipped_updates": lambda v: v >= 0,
        "seconds": lambda v: 0 <= v < math.inf,
    }
    for name, valid in ranges.items():
        if name in history and not valid(history[name]):
            raise TypeError(f"history.{name} is out of range: {history[name]!r}")
    runs = meta["runs"]
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise TypeError("runs must be a list of objects")
    for index, info in enumerate(runs):
        for name, valid in _RUN_FIELDS.items():
            if name not in info:
                if name in _OPTIONAL_RUN_FIELDS:
                    continue
                raise TypeError(f"runs[{index}].{name} is missing")
            if not valid(info[name]):
                raise TypeError(f"runs[{index}].{name} is {info[name]!r}")
        # One batch per step taken, and one drawn ahead for the next (the pending batch): the
        # replay on resume draws batches_used of them, bounded so by the horizon.
        horizon, done = info["horizon"], info["steps_done"]
        if (
            not 0 <= info["family_index"] < families
            or not 1 <= horizon <= max(2, 4 * steps)
            or not 0 <= done <= horizon
            or not 0 <= info["batches_used"] <= done + 1
            or info.get("particles", 0) < 0
            or not (math.isnan(info["initial_loss"]) or 0 < info["initial_loss"] < math.inf)
            or not 0 < info.get("lr_scale", 1.0) < math.inf
        ):
            raise TypeError(f"runs[{index}] is out of range: {info}")


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="meta-fit", unit="it", dynamic_ncols=True)


@dataclass
class _Segments:
    """Tensor membership of a problem's flat coordinates, and the rule's forward-only kernel for it."""

    ids: Tensor
    count: int
    counts: Tensor
    kernel: str | None

    @classmethod
    def of(cls, rule: UpdateRule, params: Sequence[Tensor]) -> _Segments:
        ids, count = _segment_ids(params)
        # The rule's fused CPU kernel, where it has one, steps several times faster than its
        # eager forward (same math to ~1e-6; tests/test_fused.py, tests/test_hrnn_kernel.py).
        kernel = "cpu" if ids.device.type == "cpu" and "cpu" in rule.fused_impls() else None
        if kernel is not None:
            ids = ids.to(torch.int32)
        return cls(ids, count, torch.bincount(ids, minlength=count), kernel)


def _forward_only_step(
    rule: UpdateRule, grad: Tensor, trajectory: _Particle, segments: _Segments, lr: float = 1.0
) -> Tensor:
    """The rule's update for ``grad`` without autograd (before ``lr``, which the rule may read);
    advances ``trajectory``'s rule state."""
    scales = step_scales(trajectory.params, lr) if rule.needs_step_scales else None
    if segments.kernel is None:
        update, trajectory.state, trajectory.segment_state, trajectory.global_state = rule.full_step(
            grad,
            trajectory.state,
            segments.ids,
            segments.count,
            trajectory.segment_state,
            trajectory.global_state,
            scales,
        )
        return update
    # The kernel updates the state in place: the trajectory's own copies, fp32 and contiguous.
    state = {k: v.float().contiguous() for k, v in trajectory.state.items()}
    update = torch.empty(grad.numel(), dtype=torch.float32, device=grad.device)
    context = StepContext(
        segments.ids,
        segments.count,
        trajectory.segment_state,
        trajectory.global_state,
        segment_counts=segments.counts,
        step_scales=scales,
    )
    grad = grad.float().contiguous()
    rule.fused_step(segments.kernel, grad, state, update, segment_ids=segments.ids, context=context)
    trajectory.state = state
    if context.segment_sums is not None and (rule.segment_state_spec() or rule.global_state_spec()):
        trajectory.segment_state, trajectory.global_state = check_finalize_output(
            rule,
            trajectory.segment_state,
            trajectory.global_state,
            rule.finalize(trajectory.segment_state, trajectory.global_state, context.segment_sums, segments.counts),
        )
    return update


def _optimizee_grads(
    loss: Tensor, params: Sequence[Tensor], task: str, names: Sequence[str], **kwargs: bool
) -> tuple[Tensor, ...]:
    """The loss's gradients for ``params``; a :class:`TaskError` naming those it does not reach.

    Task validation catches parameters that are never used; this catches one skipped by a
    batch (a branch taken only sometimes), which autograd reports without naming it.
    """
    grads = torch.autograd.grad(loss, params, allow_unused=True, **kwargs)
    if any(g is None for g in grads):
        unused = [name for name, g in zip(names, grads, strict=True) if g is None]
        raise TaskError(f"task {task!r}: {unused_parameters_message(unused)}")
    return grads


def _learned_step(
    rule: UpdateRule,
    instance: TaskInstance,
    names: Sequence[str],
    trajectory: _Particle,
    batch: Any,
    segments: _Segments,
    lr: float = 1.0,
) -> Tensor:
    """The loss of ``trajectory``'s parameters on ``batch``, then one step of ``rule`` on them.

    The rule runs without autograd; ``trajectory`` is advanced in place.
    """
    leaves = [p.detach().requires_grad_(True) for p in trajectory.params]
    buffers = copy_buffers(trajectory.buffers)
    with torch.enable_grad():
        loss = functional_loss(instance, names, leaves, batch, buffers)
        grads = _optimizee_grads(loss, leaves, instance.name, names)
    trajectory.buffers = buffers
    with torch.no_grad():
        update = _forward_only_step(rule, _flatten(grads), trajectory, segments, lr)
        if lr != 1.0:
            update = lr * update
        new_params, pos = [], 0
        for p in leaves:
            new_params.append(p.detach() + update[pos : pos + p.numel()].view_as(p).to(p.dtype))
            pos += p.numel()
        trajectory.params = new_params
    return loss.detach()


@torch.no_grad()
def rollout(rule: UpdateRule, instance: TaskInstance, steps: int, lr: float = 1.0) -> list[float]:
    """Optimise ``instance`` for ``steps`` steps with ``rule`` (functionally, like meta-training).

    Returns the ``steps + 1`` training minibatch losses ``f(θ_0), …, f(θ_steps)``.
    """
    return _rollout(rule, instance, steps, lr)[0]


_ModelValues = tuple[list[Tensor], dict[str, Tensor]]  # parameters and buffers


@torch.no_grad()
def _rollout(
    rule: UpdateRule, instance: TaskInstance, steps: int, lr: float
) -> tuple[list[float], list[str], _ModelValues, _ModelValues]:
    """:func:`rollout`'s losses, the parameters' names, and the model's values (parameters,
    buffers) before and after. The model itself is left as it was."""
    named = [(n, p) for n, p in instance.model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    params = [p.detach().clone() for _, p in named]
    device = params[0].device
    segments = _Segments.of(rule, params)
    start_buffers = model_buffers(instance.model)
    trajectory = _Particle(
        params,
        rule.init_state(sum(p.numel() for p in params), device=device, dtype=torch.float32),
        rule.init_segment_state(segments.count, device=device),
        rule.init_global_state(device=device),
        copy_buffers(start_buffers),
    )
    losses = [float(_learned_step(rule, instance, names, trajectory, instance.next_batch(), segments, lr))
              for _ in range(steps)]  # fmt: skip
    last = functional_loss(instance, names, trajectory.params, instance.next_batch(), copy_buffers(trajectory.buffers))
    losses.append(float(last))
    start = [p.detach().clone() for _, p in named], start_buffers
    return losses, names, start, (trajectory.params, trajectory.buffers)


def meta_fit(
    rule: UpdateRule,
    task: TaskFamily | str | Sequence[TaskFamily | str],
    steps: int = 100,
    unroll: int = 20,
    meta_iterations: int = 1000,
    *,
    meta_lr: float = 3e-3,
    meta_lr_schedule: str = "constant",
    instances: int = 1,
    meta_loss: str = "log",
    ramp_power: float = 1.0,
    second_order: bool = False,
    clip_grad_norm: float = 1.0,
    random_horizon: bool = False,
    meta_grad_fraction: float = 1.0,
    log_floor: float = 0.0,
    lr_scale_range: float = 1.0,
    estimator: str = "tbptt",
    pes_pairs: int = 8,
    pes_std: float = 0.01,
    grad_checkpoint_steps: int = 0,
    seed: int = 0,
    validate_every: int = 50,
    validation_instances: int = 4,
    validation_steps: int = 0,
    validation_lr_scales: Sequence[float] = (1.0,),
    validation_metric: str = "objective",
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    progress: bool = True,
    time_budget: float | None = None,
    callback: Callable[[MetaFitHistory], None] | None = None,
) -> UpdateRule:
    """Meta-train ``rule`` in place on a problem class and return it.

    Args:
        rule: the update rule to train (e.g. ``CoordinateLSTM()``).
        task: a :class:`~learned_optim.tasks.Task` built from your own ``nn.Module``, a
            built-in task name (``learned_optim.tasks.list_tasks()``), or a list of them
            (each instance picks one at random).
        steps: inner optimisation steps per instance (horizon).
        unroll: inner steps per truncation.
        meta_iterations: number of meta-gradient steps (0 returns the starting rule, validated
            when ``validate_every`` is set: a way to re-save a rule under changed options).
        meta_lr: Adam learning rate on the rule's weights.
        meta_lr_schedule: ``"constant"`` or ``"cosine"`` (decay to 5% of ``meta_lr``).
        instances: instances optimised side by side per meta-iteration (one rule call).
        meta_loss: ``"log"`` (mean log loss ratio), ``"mean"`` (mean loss), ``"ramp"``
            (mean loss weighted linearly towards the end of the horizon) or ``"log-ramp"``
            (log loss ratios weighted so), or ``"final"`` (log ratio of the whole-training-split
            loss at the end of each truncation: the final loss itself when ``unroll == steps``).
        ramp_power: the ramps weigh step ``t`` in proportion to ``t ** ramp_power``.
        second_order: differentiate through the optimizee's gradients.
        clip_grad_norm: meta-gradient norm clip.
        random_horizon: horizons drawn log-uniformly between ``steps/4`` and ``4*steps``.
        meta_grad_fraction: backpropagate through this random fraction of coordinates only
            (unbiased, cheaper meta-gradients for coordinatewise rules).
        log_floor: lower bound of each step's ``f_t / f_0`` in the log meta-losses (``0``: none).
        lr_scale_range: multiply each meta-training instance's updates by a random factor in
            ``[1/r, r]`` (log-uniform) so the rule learns to correct a mis-set learning rate.
        estimator: ``"tbptt"`` (backpropagation through each truncation) or ``"pes"``
            (persistent evolution strategies: forward-only, unbiased over the whole horizon;
            see :class:`MetaFitConfig`).
        pes_pairs: antithetic perturbation pairs per instance with ``estimator="pes"``.
        pes_std: standard deviation of the rule-weight perturbations with ``estimator="pes"``.
        grad_checkpoint_steps: recompute the unroll in segments of this many steps during the
            backward pass instead of storing every step (``0``: off); same meta-gradient, far
            less memory for long unrolls (see :class:`MetaFitConfig`).
        seed: makes the run deterministic.
        validate_every: validate on held-out instances every this many iterations and
            keep the best weights (``0``: keep the last weights).
        validation_instances: instances per validation.
        validation_steps: horizon of the validation runs (``0``: ``steps``).
        validation_lr_scales: run each validation instance at each of these learning-rate
            multipliers and score the mean (default: at 1 only).
        validation_metric: ``"objective"`` (the meta-loss) or ``"final"`` (log ratio of the
            whole-training-split loss after the last step to the one before the first).
        checkpoint_dir: write checkpoints here every ``checkpoint_every`` iterations. Without
            ``resume``, a run there starts over: its first checkpoint replaces the old one (and
            an old ``best/`` while it has no best weights of its own).
        checkpoint_every: iterations between checkpoints.
        resume: continue from ``checkpoint_dir``'s checkpoint if there is one.
        progress: show a progress bar.
        time_budget: stop after this many seconds of meta-training, counted over the whole
            run (a resumed run goes on from the seconds its checkpoint recorded).
        callback: called with the history after each iteration (a callable or None).

    Returns:
        The rule (the same object), holding the best validated weights.
    """
    if isinstance(validation_lr_scales, (str, bytes)) or not isinstance(validation_lr_scales, Iterable):
        raise TypeError(
            "validation_lr_scales must be a sequence of learning-rate multipliers > 0, e.g. (1.0,) or "
            f"(0.1, 1.0, 10.0), got {validation_lr_scales!r}"
        )
    config = MetaFitConfig(
        steps=steps,
        unroll=unroll,
        meta_iterations=meta_iterations,
        meta_lr=meta_lr,
        meta_lr_schedule=meta_lr_schedule,
        instances=instances,
        meta_loss=meta_loss,
        ramp_power=ramp_power,
        second_order=second_order,
        clip_grad_norm=clip_grad_norm,
        random_horizon=random_horizon,
        meta_grad_fraction=meta_grad_fraction,
        log_floor=log_floor,
        lr_scale_range=lr_scale_range,
        estimator=estimator,
        pes_pairs=pes_pairs,
        pes_std=pes_std,
        grad_checkpoint_steps=grad_checkpoint_steps,
        seed=seed,
        validate_every=validate_every,
        validation_instances=validation_instances,
        validation_steps=validation_steps,
        validation_lr_scales=tuple(validation_lr_scales),
        validation_metric=validation_metric,
        checkpoint_every=checkpoint_every,
    )
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    trainer = MetaTrainer(rule, task, config, checkpoint_dir, progress, time_budget, callback)
    if resume and (Path(checkpoint_dir) / "checkpoint.json").is_file():
        trainer.load_checkpoint(checkpoint_dir)
    result = trainer.run()
    result.meta_fit_history = trainer.history  # type: ignore[attr-defined]
    return result
