"""``LearnedOptimizer``: a ``torch.optim.Optimizer`` whose update comes from an update rule.

The class only keeps the books (param groups, per-parameter state, state_dict, closures);
the rule's math lives in :mod:`learned_optim.rules` and is applied by :mod:`learned_optim.functional`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import numbers
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import safetensors.torch
import torch
from torch import Tensor
from torch.optim import Optimizer

from learned_optim._sharding import (
    global_nonfinite_flags,
    gradient_like,
    is_dtensor,
    local_coordinates,
    local_state,
    parameter_shaped_state,
    shard_sum_reducer,
    sharded_state,
    whole_tensor_state,
)
from learned_optim._warnings import user_stacklevel
from learned_optim.functional import (
    FUSED_CHUNK_SIZE,
    FlatState,
    StepEntry,
    chunk_size_option,
    default_chunk_size,
    fused_learned_step,
    learned_step,
    nonfinite_mask,
    nonfinite_params_note,
)
from learned_optim.rules.base import StepContext, UpdateRule, check_state_specs, checked_initial_state, same_config
from learned_optim.rules.registry import get_rule_class
from learned_optim.weights import DEFAULT_RULE, resolve_rule

STATE_PREFIX = "rule."
IMPLS = ("auto", "eager", "triton", "cpu")
SEGMENT_PREFIX = "rule.segment."
GLOBAL_PREFIX = "rule_global."
"""Keys of the global state's copy in one parameter's saved state (see ``state_dict``)."""
RULE_FINGERPRINT_KEY = "rule_sha256"
"""Param-group entry of a saved state_dict: which rule it was saved with."""
SMALL_LR = 1e-2
"""Below this, ``lr`` looks copied from Adam (it is a multiplier of the rule's update): warn."""
FUSED_STATE_DTYPES = (torch.float32, torch.bfloat16)
"""State dtypes the fused kernels store (others step eagerly)."""
# Kept by copy.deepcopy and pickling beside torch's own (defaults, state, param_groups); caches,
# kernel checks and flat buffers are rebuilt instead, hooks are dropped as torch.optim does.
_COPIED_ATTRIBUTES = (
    "rule",
    "chunk_size",
    "state_dtype",
    "nonfinite",
    "warn_nonfinite",
    "impl",
    "_fused_impls",
    "_hierarchical",
    "_global_state",
    "_groups_fingerprint",
)


def _tracing_or_capturing() -> bool:
    """Whether the step is being traced by torch.compile or captured into a CUDA graph."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


_AUTOCAST_AVAILABLE: dict[str, bool] = {"cpu": True, "cuda": True}
"""Device types with autocast, looked up once each: torch.compile cannot trace the lookup
(``torch.amp.is_autocast_available`` is a C call Dynamo skips, torch 2.11)."""


def _autocast_disabled(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """A context that turns autocast off on ``device`` (nothing where autocast does not exist)."""
    available = _AUTOCAST_AVAILABLE.get(device.type)
    if available is None:
        available = _AUTOCAST_AVAILABLE[device.type] = torch.amp.is_autocast_available(device.type)
    if available:
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _check_non_negative(name: str, value: object) -> None:
    """``TypeError`` unless ``value`` is a number (or one-element tensor); ``ValueError`` unless it
    is finite and >= 0 (an infinite lr or weight decay would turn the parameters into inf/NaN)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise TypeError(
                f"{name} must be a number or a one-element float tensor, got a tensor of shape "
                f"{tuple(value.shape)} and dtype {value.dtype}"
            )
        number = float(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    else:
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not 0.0 <= number < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def _check_group_options(group: dict[str, Any], *, warn_small_lr: bool = True) -> None:
    """Check the ``lr`` / ``weight_decay`` / ``maximize`` a group (or the defaults) sets:
    ``TypeError`` for a non-number (non-bool ``maximize``), ``ValueError`` below 0, NaN or
    infinite, and (``warn_small_lr``) a ``UserWarning`` for an lr that looks copied from Adam."""
    if "lr" in group:
        lr = group["lr"]
        _check_non_negative("lr", lr)
        if warn_small_lr and 0.0 < lr < SMALL_LR:
            warnings.warn(
                f"LearnedOptimizer: lr={float(lr)} multiplies the learned update (1.0 applies the rule as it "
                "was meta-trained); an Adam-style value such as 1e-3 makes every step of an LSTM rule about "
                "1000 times smaller than the rule's. Leave lr at its default unless you mean to shrink the steps.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
    if "weight_decay" in group:
        _check_non_negative("weight_decay", group["weight_decay"])
    if "maximize" in group and not _is_bool(group["maximize"]):
        value = group["maximize"]
        raise TypeError(f"maximize must be True or False, got {type(value).__name__} {value!r}")


def rule_fingerprint(rule: UpdateRule) -> str:
    """SHA-256 of a rule's type, config and weights: names the rule in every saved param group."""
    digest = hashlib.sha256(rule.rule_type.encode())
    digest.update(json.dumps(rule.config, sort_keys=True, default=str).encode())
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in rule.state_dict().items()}
    digest.update(safetensors.torch.save(weights))  # names, shapes and values, in a fixed order
    return digest.hexdigest()


def _all_zero(tensors: list[Any]) -> bool:
    """Whether every value is zero (floats or tensors, a DTensor over all its shards); run eagerly
    even inside a compiled step (``_EAGER_IN_GRAPH``)."""
    flags = []
    for t in tensors:
        flag = t.ne(0).any() if isinstance(t, Tensor) else torch.tensor(float(t) != 0)
        flags.append((flag.full_tensor() if is_dtensor(flag) else flag).cpu())
    return not bool(torch.stack(flags).any())


@torch.no_grad()
def _step_outside_graph(optimizer: LearnedOptimizer, closure: Callable[[], float] | None) -> float | None:
    """The body of ``optimizer.step(closure)`` run eagerly from a compiled caller (a graph break,
    through ``_EAGER_IN_GRAPH``)."""
    return optimizer._step(closure)


# The two helpers above under torch.compiler.disable, made by the first optimizer rather than
# at import: the decorator imports torch._dynamo (1.3 s of `import learned_optim`), which
# torch.optim.Optimizer's constructor imports anyway. Made outside any trace, a compiled step
# only looks them up.
_EAGER_IN_GRAPH: dict[str, Callable[..., Any]] = {}


def _make_eager_in_graph() -> None:
    if not _EAGER_IN_GRAPH:
        _EAGER_IN_GRAPH["all_zero"] = torch.compiler.disable(_all_zero)
        _EAGER_IN_GRAPH["step"] = torch.compiler.disable(_step_outside_graph)


def _check_state_layout(state_dict: Any) -> None:
    """``ValueError`` unless ``state_dict`` has torch.optim's layout: a dict whose optional
    ``"state"`` maps each saved parameter to a dict keyed by names (checked before its contents)."""
    if not isinstance(state_dict, dict):
        raise ValueError(f"optimizer state_dict must be a dict, got {type(state_dict).__name__}")
    state = state_dict.get("state", {})
    if not isinstance(state, dict):
        raise ValueError(
            "optimizer state_dict: 'state' must be a dict from parameter index to its state, "
            f"got {type(state).__name__}"
        )
    for idx, values in state.items():
        if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
            got = type(values).__name__ if not isinstance(values, dict) else f"keys {list(values)}"
            raise ValueError(
                f"optimizer state_dict: state of parameter {idx!r} must be a dict keyed by names, got {got}"
            )


def _is_bool(value: object) -> bool:
    """A Python bool or a numpy bool scalar (a string such as "no" would be truthy)."""
    return isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", None) == "b"


class LearnedOptimizer(Optimizer):
    """Drop-in ``torch.optim`` optimizer driven by a learned update rule.

    ``param += lr * rule(grad)`` for every coordinate, with the rule's per-coordinate
    state kept in ``self.state[param]``. All parameters of a step go through the rule
    as one flat batch of coordinates, in chunks of ``chunk_size`` so temporary memory
    stays bounded whatever the model size.

    Args:
        params: an iterable of tensors or of param-group dicts, as for any optimizer.
        pretrained: the update rule: ``None`` for the bundled default, a bundled name
            (see :func:`learned_optim.list_pretrained`), a local directory holding
            ``config.json`` + ``model.safetensors``, a Hugging Face Hub repo id, or an
            :class:`~learned_optim.rules.UpdateRule` instance (used as is, not copied).
        lr: multiplies the learned update (1.0 applies the rule as it was meta-trained);
            LR schedulers scale it as usual.
        weight_decay: decoupled weight decay, ``param *= 1 - lr * weight_decay`` each step.
        maximize: maximise the objective instead of minimising it.
        momentum: read by no rule (each keeps its own momentum). Kept in every param group for
            the LR schedulers that cycle a momentum (``OneCycleLR``, ``CyclicLR``), and accepted
            so that ``type(opt)(params, **opt.defaults)`` rebuilds an optimizer (``defaults``
            holds the per-group options only: pass ``pretrained`` and the rest again).
        chunk_size: coordinates per rule call on the eager path (bounds temporary memory);
            ``None`` lets the rule pick on CPU (``UpdateRule.eager_cpu_chunk_size``: 2**14
            for the LSTM, measured fastest there, 2**16 for the hierarchical
            RNN) and uses 2**16 elsewhere. Fused kernels use chunks of ``max(chunk_size, 2**22)``.
        state_dtype: dtype of the rule's state, per-coordinate and also per-tensor and global
            (fp32 by default, whatever the parameter dtype; the rule always computes in its
            own dtype).
        nonfinite: what to do with a parameter whose gradient holds inf or NaN:
            ``"skip"`` (default) leaves that parameter and its state unchanged this step
            and warns; ``"error"`` raises ``FloatingPointError`` before anything changes.
        warn_nonfinite: with ``nonfinite="skip"``, warn when a step was skipped. The check
            reads one flag back from the device; turn it off for CUDA-graph capture.
        impl: how the rule runs: ``"eager"`` (its PyTorch ``forward`` over chunks of all
            tensors), ``"triton"`` (one fused Triton kernel per chunk; CUDA, or any device
            under ``TRITON_INTERPRET=1``), ``"cpu"`` (a fused C kernel, compiled on first use
            with the system's C compiler), or ``"auto"`` (default): the rule's fused kernel
            for the device when it has one that can run here, else eager. With a fused
            kernel the state of all parameters of a device lives in one buffer per key, and
            ``self.state[p]`` holds views into it.
        revision: Hub revision (branch, tag or commit) when ``pretrained`` is a repo id.
        cache_dir: Hub cache directory when ``pretrained`` is a repo id.
        token: Hub token for a private repo (default: the logged-in token or ``HF_TOKEN``).
        force_download: fetch a Hub rule again even if it is cached.
        local_files_only: load a Hub rule from the cache only, never the network.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        pretrained: str | UpdateRule | None = None,
        lr: float = 1.0,
        weight_decay: float = 0.0,
        maximize: bool = False,
        *,
        momentum: float = 0.0,
        chunk_size: int | None = None,
        state_dtype: torch.dtype = torch.float32,
        nonfinite: str = "skip",
        warn_nonfinite: bool = True,
        impl: str = "auto",
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        token: str | bool | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
    ) -> None:
        _check_group_options({"lr": lr, "weight_decay": weight_decay, "maximize": maximize})
        _check_non_negative("momentum", momentum)
        if chunk_size is not None:
            chunk_size = chunk_size_option(chunk_size, allowed="an int >= 1 or None")
        if nonfinite not in ("skip", "error"):
            raise ValueError(f"nonfinite must be 'skip' or 'error', got {nonfinite!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
            raise ValueError(f"state_dtype must be a floating-point torch.dtype, got {state_dtype!r}")
        # "momentum" is a placeholder no step reads (the rule keeps its own momentum): OneCycleLR
        # and CyclicLR cycle a momentum by default and refuse optimizers without one.
        defaults = {"lr": lr, "weight_decay": weight_decay, "maximize": maximize, "momentum": momentum}
        self._holds_dtensors = False  # set by add_param_group
        super().__init__(params, defaults)
        self.rule: UpdateRule = resolve_rule(
            DEFAULT_RULE if pretrained is None else pretrained,
            revision=revision,
            cache_dir=cache_dir,
            is_default=pretrained is None,
            token=token,
            force_download=force_download,
            local_files_only=local_files_only,
        )
        check_state_specs(self.rule)  # a malformed spec is named here, not inside torch.zeros at the first step
        self.chunk_size = chunk_size
        self.state_dtype = state_dtype
        self.nonfinite = nonfinite
        self.warn_nonfinite = warn_nonfinite
        # Hierarchical rules keep state shared by all tensors (e.g. a global RNN).
        self._global_state: dict[str, Tensor] | None = None
        self._hierarchical = bool(self.rule.segment_state_spec() or self.rule.global_state_spec())
        self._state_trailing = {name: tuple(shape) for name, shape in self.rule.state_spec().items()}
        self.impl = impl
        # The rule's kernels that can build here, found once (not while a step is being traced).
        self._fused_impls: tuple[str, ...] = () if impl == "eager" else tuple(self.rule.fused_impls())
        if impl in ("cpu", "triton") and state_dtype not in FUSED_STATE_DTYPES:
            raise ValueError(
                f"impl={impl!r} stores the rule state in {FUSED_STATE_DTYPES}, got state_dtype={state_dtype}; "
                "use impl='eager' for other state dtypes"
            )
        if impl != "auto" and impl != "eager" and impl not in self._fused_impls:
            from learned_optim.rules.lstm_cpu import cpu_kernel_error
            from learned_optim.rules.lstm_triton import triton_available

            hint = ""
            try:
                registered = get_rule_class(self.rule.rule_type)
            except ValueError:  # a custom rule that is not registered: it has no kernels of ours
                registered = type(self.rule)
            if type(self.rule) is not registered:
                hint = f" (a subclass of {self.rule.rule_type} that changes its math steps eagerly)"
            elif impl == "triton" and not triton_available():
                hint = " (is the `triton` package installed?)"
            elif impl == "cpu" and cpu_kernel_error():
                hint = f" ({cpu_kernel_error()})"
            raise ValueError(
                f"impl={impl!r}: rule {type(self.rule).__name__} has no such fused kernel{hint}; "
                f"it has {self._fused_impls or 'none'}. Use impl='eager' or 'auto'."
            )
        self._reset_transient()
        if self._hierarchical:
            # Made here, not in the first step: a compiled first step would not keep it.
            device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
            self._global_state = self._fresh_global_state(device)
        self._name_rule_in_groups()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, as ``torch.optim`` does; its own ``lr`` / ``weight_decay`` are
        checked like the constructor's (``ValueError`` below 0, a warning for an Adam-style lr)."""
        if isinstance(param_group, dict):
            _check_group_options(param_group)
            params = param_group.get("params")
            if params is not None and not isinstance(params, (Tensor, set)):
                param_group["params"] = params = list(params)  # as torch does; a generator is read once
                seen: dict[int, tuple[int, str]] = {}
                for i, entry in enumerate(params):
                    # Named parameters come as (name, tensor): tied weights listed under two names
                    # (named_parameters(remove_duplicate=False)) are the same tensor.
                    named = isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)
                    p, label = (entry[1], f"{entry[0]!r}, ") if named else (entry, "")
                    if id(p) in seen:
                        # torch only warns; the update would be applied twice while the state advances once.
                        first, first_label = seen[id(p)]
                        raise ValueError(
                            f"LearnedOptimizer: a param group lists the same parameter twice (positions "
                            f"{first} and {i}{': ' if label else ', '}{first_label}{label}"
                            f"shape {tuple(getattr(p, 'shape', ()))}); "
                            "list each parameter once"
                        )
                    seen[id(p)] = (i, label)
        super().add_param_group(param_group)
        self._holds_dtensors = any(is_dtensor(p) for group in self.param_groups for p in group["params"])
        if hasattr(self, "rule"):  # groups given to the constructor are named once the rule is known
            self._name_rule_in_groups()

    def _name_rule_in_groups(self) -> None:
        """Put the rule's fingerprint into every live param group (``"rule_sha256"``), not only
        into saved ones: torch.distributed.checkpoint's flattened state dicts
        (``flatten_optimizer_state_dict=True``) restore only the group keys the live groups have,
        and loading needs it to know which rule the state was saved with."""
        fingerprint = rule_fingerprint(self.rule)
        self._groups_fingerprint = fingerprint
        for group in self.param_groups:
            group[RULE_FINGERPRINT_KEY] = fingerprint

    def _check_groups_name_our_rule(self) -> None:
        """Refuse to step when a param group names another rule: its state was loaded from a
        checkpoint of that rule past ``load_state_dict`` (``ZeroRedundancyOptimizer.load_state_dict``
        copies the saved groups' keys into ours and writes the state in directly)."""
        for i, group in enumerate(self.param_groups):
            named = group.setdefault(RULE_FINGERPRINT_KEY, self._groups_fingerprint)
            if named != self._groups_fingerprint:
                raise RuntimeError(
                    f"LearnedOptimizer: param group {i} names another update rule ({RULE_FINGERPRINT_KEY} "
                    f"{str(named)[:12]}…) than this optimizer runs ({self.rule.rule_type}, "
                    f"{self._groups_fingerprint[:12]}…): its state was loaded from a checkpoint of that rule "
                    "without LearnedOptimizer.load_state_dict's checks (ZeroRedundancyOptimizer.load_state_dict "
                    "loads that way). Nothing was updated; build the optimizer with the rule the checkpoint "
                    "was saved with (the same `pretrained`)."
                )

    def _reset_transient(self) -> None:
        _make_eager_in_graph()  # before any step, which may be traced
        self._rule_copies = {}
        # "device:impl" -> why the kernel could not run there (impl="auto" then steps eagerly).
        self._kernel_failures: dict[str, str] = {}
        self._kernels_checked: set[str] = set()
        # Per device: the flat state buffers a fused kernel runs over.
        self._flat_states: dict[torch.device, FlatState] = {}

    def _fresh_global_state(self, device: torch.device) -> dict[str, Tensor]:
        with torch.no_grad():  # learned initial states: no autograd history in optimizer state
            rule = self._rule_for(device)
            fresh = rule.init_global_state(device, self.state_dtype)
            return checked_initial_state(rule, "init_global_state", fresh, None, self.state_dtype)

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and pickling keep: torch's optimizer state, the rule and settings."""
        state = super().__getstate__()
        state.update({name: self.__dict__[name] for name in _COPIED_ATTRIBUTES})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._reset_transient()
        self._state_trailing = {name: tuple(shape) for name, shape in self.rule.state_spec().items()}
        self._holds_dtensors = any(is_dtensor(p) for group in self.param_groups for p in group["params"])

    # ------------------------------------------------------------------ state
    def _init_param_state(self, p: Tensor, numel: int) -> dict[str, Tensor]:
        rule = self._rule_for(p.device)
        state = rule.init_state(numel, device=p.device, dtype=self.state_dtype)
        segment = rule.init_segment_state(1, device=p.device, dtype=self.state_dtype)
        fresh = {
            STATE_PREFIX + k: v
            for k, v in checked_initial_state(rule, "init_state", state, numel, self.state_dtype).items()
        }
        checked_initial_state(rule, "init_segment_state", segment, 1, self.state_dtype)
        fresh.update({SEGMENT_PREFIX + k: v for k, v in segment.items()})
        return fresh

    def _rule_for(self, device: torch.device) -> UpdateRule:
        """The rule on ``device`` (a cached copy if the user's rule lives elsewhere)."""
        first = next(self.rule.parameters(), None)
        if first is None or first.device == device:
            return self.rule
        key = (device, first.dtype)
        cached = self._rule_copies.get(key)
        if cached is None:
            cached = copy.deepcopy(self.rule).to(device)
            self._rule_copies[key] = cached
        return cached

    def impl_for(self, device: torch.device) -> str:
        """The implementation a step on ``device`` uses (``impl`` with ``"auto"`` resolved).

        With ``"auto"``, the chosen kernel is tried once on the device first; if it cannot be
        built or run there, a ``RuntimeWarning`` says why and the eager path is used instead.
        """
        from learned_optim.rules.lstm_triton import triton_usable_on

        if self.impl == "eager":
            return "eager"
        if self.impl == "auto":
            fused = self._fused_impls if self.state_dtype in FUSED_STATE_DTYPES else ()
            choice = "eager"
            if device.type == "cuda" and "triton" in fused and triton_usable_on(device):
                choice = "triton"
            elif device.type == "cpu" and "cpu" in fused:
                choice = "cpu"
            return choice if choice == "eager" or self._kernel_runs(device, choice) else "eager"
        if self.impl == "triton" and not triton_usable_on(device):
            raise RuntimeError(
                f"impl='triton' runs on CUDA devices (or anywhere under TRITON_INTERPRET=1), "
                f"not on {device}; use impl='auto' or 'eager'"
            )
        if self.impl == "cpu" and device.type != "cpu":
            raise RuntimeError(f"impl='cpu' runs on CPU tensors, not on {device}; use impl='auto'")
        return self.impl

    def _kernel_runs(self, device: torch.device, impl: str) -> bool:
        """Whether ``impl`` builds and runs on ``device``: tried once on a few coordinates of fresh
        state before the first step uses it. Where it fails, ``impl="auto"`` warns once and steps
        eagerly there, before anything was changed (an explicit ``impl`` raises the error instead)."""
        key = f"{device}:{impl}"
        if key in self._kernels_checked or _tracing_or_capturing():
            return key not in self._kernel_failures
        self._kernels_checked.add(key)
        rule = self._rule_for(device)
        n = 64
        with torch.no_grad():
            state = {k: v.detach().contiguous() for k, v in rule.init_state(n, device, self.state_dtype).items()}
            ids = torch.zeros(n, dtype=torch.int32, device=device)
            context = None
            if self._hierarchical:
                segment = rule.init_segment_state(1, device, self.state_dtype)
                context = StepContext(
                    segment_ids=ids,
                    num_segments=1,
                    segment_state={k: v.detach() for k, v in segment.items()},
                    global_state={k: v.detach() for k, v in rule.init_global_state(device, self.state_dtype).items()},
                    segment_counts=torch.tensor([n], device=device),
                    step_scales=torch.zeros(1, dtype=torch.float32, device=device) if rule.needs_step_scales else None,
                )
            elif getattr(rule, "needs_segments", False):  # per-tensor inputs: the few coordinates are one tensor
                context = StepContext(segment_ids=ids, num_segments=1, segment_counts=torch.tensor([n], device=device))
            # float32 as the real step's buffers are, whatever torch's default dtype is.
            grad = torch.zeros(n, dtype=torch.float32, device=device)
            update = torch.empty(n, dtype=torch.float32, device=device)
            try:
                rule.fused_step(impl, grad, state, update, segment_ids=ids, context=context)
            except Exception as error:  # whatever broke the kernel (a build, a launch), eager is right
                self._kernel_failures[key] = f"{type(error).__name__}: {error}"
        if key in self._kernel_failures:
            warnings.warn(
                f"LearnedOptimizer: the fused {impl!r} kernel of {self.rule.rule_type} does not run on {device} "
                f"({self._kernel_failures[key][:300]}); stepping eagerly there. Pass impl='eager' to silence this, "
                f"or impl={impl!r} to get the error.",
                RuntimeWarning,
                stacklevel=4,
            )
            return False
        return True

    def _flat_state_for(self, device: torch.device, entries: list[StepEntry], params: list[Tensor]) -> FlatState:
        """The device's flat state buffers, rebuilt (state copied in, views handed out) when the
        set of parameters changed or their state tensors were replaced (e.g. by load_state_dict)."""
        flat = self._flat_states.get(device)
        if flat is not None and flat.holds([e.state for e in entries]):
            return flat

        def release(index: int, key: str, view: Tensor) -> None:
            entries[index].state[key] = view
            self.state[params[index]][STATE_PREFIX + key] = view

        flat = FlatState.gather(
            [e.state for e in entries], [e.param.numel() for e in entries], release, dtype=self.state_dtype
        )
        if device in self._flat_states:
            # Parameters left out of the new buffers (no gradient this step) get their own copy
            # of their state, so that the old buffers are freed.
            stepping = {id(p) for p in params}
            for p, state in self.state.items():
                if id(p) not in stepping and p.device == device:
                    for key, value in state.items():
                        if key.startswith(STATE_PREFIX) and not key.startswith(SEGMENT_PREFIX):
                            state[key] = value.clone()
        for index, (entry, p) in enumerate(zip(entries, params, strict=True)):
            views = flat.views(index)
            entry.state = views
            self.state[p].update({STATE_PREFIX + k: v for k, v in views.items()})
        self._flat_states[device] = flat
        return flat

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply one learned update to every parameter that has a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or ``None``.
        """
        if self._holds_dtensors and torch.compiler.is_compiling():
            # Dynamo cannot trace a step over DTensor shards (torch 2.13 fails inside Dynamo):
            # a compiled caller runs the step eagerly, with a graph break.
            return _EAGER_IN_GRAPH["step"](self, closure)
        return self._step(closure)

    def _step(self, closure: Callable[[], float] | None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        if not torch.compiler.is_compiling():
            self._check_groups_name_our_rule()
        self._adopt_global_copies()
        if not self._any_param_state() and self._is_state_creation_step():
            # lr 0 and all-zero gradients before any state exists: a step that can change nothing
            # but the state, as torch.distributed.checkpoint makes to create state before
            # loading into it. Only create the state: advancing it would alter the later run.
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self._check_steppable(p, -1)
                        self.state[p].update(self._init_param_state(p, local_coordinates(p).numel()))
            if self._global_state is not None:
                device = next(iter(self._global_state.values())).device
                for key, value in self._fresh_global_state(device).items():
                    self._global_state[key].copy_(value)
            return loss

        if self._global_state is not None and not self._any_param_state():
            # No parameter has state: a new optimizer, or opt.state.clear() (how torch.optim users
            # reset one). The global state lives outside self.state, so it starts afresh here too.
            # In place: a compiled or captured step keeps reading the same tensors.
            device = next(iter(self._global_state.values())).device
            for key, value in self._fresh_global_state(device).items():
                self._global_state[key].copy_(value)

        entries_by_device: dict[torch.device, list[StepEntry]] = {}
        params_by_device: dict[torch.device, list[Tensor]] = {}
        sharded: list[tuple[StepEntry, Tensor, Tensor]] = []  # DTensor parameters' entries
        index = -1  # of the parameter over all groups, as in state_dict()["state"]
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                grad = p.grad
                self._check_steppable(p, index)
                sharded_param = is_dtensor(p)
                if sharded_param:
                    grad = gradient_like(p, grad, f"parameter {index}")
                param_view = local_coordinates(p)
                grad_view = local_coordinates(grad)
                state = self.state[p]
                if not state:
                    state.update(self._init_param_state(p, param_view.numel()))
                rule_state = {
                    k[len(STATE_PREFIX) :]: v
                    for k, v in state.items()
                    if k.startswith(STATE_PREFIX) and not k.startswith(SEGMENT_PREFIX)
                }
                if rule_state and not sharded_param:
                    rule_state = self._state_as_rows(p, index, state, rule_state)
                rows = next((v.shape[0] for v in rule_state.values()), param_view.numel())
                if rows != param_view.numel():
                    # The parameter was resized in place (p.data = ...) after its state was made:
                    # the fused path would update only the rows it has state for.
                    raise RuntimeError(
                        f"LearnedOptimizer: parameter {index} (shape {tuple(p.shape)}) has {param_view.numel()} "
                        f"elements, but its rule state has {rows} rows: it was resized after its first step. "
                        "Drop its state (del optimizer.state[p]) to start it afresh, or build a new optimizer."
                    )
                segment_state = {k[len(SEGMENT_PREFIX) :]: v for k, v in state.items() if k.startswith(SEGMENT_PREFIX)}
                entry = StepEntry(
                    param=param_view,
                    grad=grad_view,
                    state=rule_state,
                    # float(): any numbers.Real passes the checks, but the foreach ops take only
                    # Python numbers (a Fraction or Decimal-like lr fails there).
                    lr=lr if isinstance(lr := group["lr"], Tensor) else float(lr),
                    weight_decay=float(group["weight_decay"]),
                    maximize=group["maximize"],
                    segment_state=segment_state,
                )
                entries_by_device.setdefault(param_view.device, []).append(entry)
                params_by_device.setdefault(param_view.device, []).append(p)
                if sharded_param:
                    entry.shard = True
                    sharded.append((entry, p, grad))

        if self._holds_dtensors:
            # Every shard of a tensor skips a step (or raises) together, as the whole tensor would;
            # every rank makes this all-reduce, whichever gradients it has.
            entry_of = {id(p): entry for entry, p, _ in sharded}
            grad_of = {id(p): grad for _, p, grad in sharded}
            dtensors = [
                (f"parameter {i} (shape {tuple(p.shape)})", p)
                for i, p in enumerate(p for group in self.param_groups for p in group["params"])
                if is_dtensor(p)
            ]
            flags = global_nonfinite_flags(
                [p for _, p in dtensors],
                [grad_of.get(id(p)) for _, p in dtensors],
                [name for name, _ in dtensors],
                check_consistency=not _tracing_or_capturing(),
            )
            for (_, p), flag in zip(dtensors, flags, strict=True):
                if flag is not None:
                    entry_of[id(p)].nonfinite_flag = flag

        if self._hierarchical and len(entries_by_device) > 1:
            raise RuntimeError(
                f"{self.rule.rule_type} keeps state shared by all parameters: put them on one device "
                f"(got {sorted(str(d) for d in entries_by_device)})"
            )
        if self.nonfinite == "error" and len(entries_by_device) > 1:
            # Every device is screened before any is updated, so an error leaves all untouched.
            for device, entries in entries_by_device.items():
                if device.type == "meta":
                    continue
                bad = [i for i, s in enumerate(nonfinite_mask([e.grad for e in entries]).tolist()) if s]
                if bad:
                    raise FloatingPointError(
                        f"non-finite gradient in parameter tensor(s) {bad} on {device}"
                        + nonfinite_params_note([entries[i].param for i in bad])
                    )
        # Reading the non-finite flags back (for the warning and the unmasked fast path) is a
        # host sync: left out while torch.compile traces or a CUDA graph captures the step.
        host_check = self.warn_nonfinite and not _tracing_or_capturing()
        for device, entries in entries_by_device.items():
            # step() is often called inside the training step's autocast region, where the rule's
            # matmuls would run in bf16/fp16: the rule computes in its own dtype, as documented.
            with _autocast_disabled(device):
                # Meta tensors have no values to screen (shape-only dry runs).
                check_values = device.type != "meta"
                global_device = next((v.device for v in (self._global_state or {}).values()), device)
                if global_device != device:
                    # The parameters moved after the optimizer was built.
                    self._global_state = {k: v.to(device) for k, v in self._global_state.items()}
                impl = self.impl_for(device)
                rule = self._rule_for(device)
                chunk_size = self.chunk_size or default_chunk_size(rule, device)
                device_params = params_by_device[device]
                shards = {i: p for i, (e, p) in enumerate(zip(entries, device_params, strict=True)) if e.shard}
                reduce_shards = shard_sum_reducer(shards) if shards else None
                if impl == "eager":
                    skipped = learned_step(
                        rule,
                        entries,
                        chunk_size=chunk_size,
                        nonfinite=self.nonfinite if check_values else "skip",
                        global_state=self._global_state,
                        host_check=host_check and check_values,
                        reduce_shards=reduce_shards,
                    )
                else:
                    skipped = fused_learned_step(
                        rule,
                        impl,
                        entries,
                        self._flat_state_for(device, entries, params_by_device[device]),
                        chunk_size=max(chunk_size, FUSED_CHUNK_SIZE),
                        nonfinite=self.nonfinite if check_values else "skip",
                        host_check=host_check and check_values,
                        global_state=self._global_state,
                        reduce_shards=reduce_shards,
                    )
                if skipped is not None and host_check and check_values and bool(skipped.any()):
                    skipped_params = [e.param for e, s in zip(entries, skipped.tolist(), strict=True) if s]
                    warnings.warn(
                        f"LearnedOptimizer: {int(skipped.sum())} parameter tensor(s) had non-finite "
                        "gradients; their update was skipped and their state kept"
                        + nonfinite_params_note(skipped_params),
                        RuntimeWarning,
                        # Past torch's step wrappers (hooks, no_grad, a scheduler's, GradScaler's).
                        stacklevel=user_stacklevel(),
                    )
        return loss

    def _check_steppable(self, p: Tensor, index: int) -> None:
        """Refuse a parameter the step cannot update (``index`` -1: not known)."""
        which = f"parameter {index}" if index >= 0 else "a parameter"
        if is_dtensor(p.grad) and not is_dtensor(p):
            raise TypeError(
                f"LearnedOptimizer: {which} (shape {tuple(p.shape)}) is an ordinary tensor but its "
                "gradient is a DTensor; both must be DTensors on the same device mesh"
            )
        if not (p.is_floating_point() or p.is_complex()):
            raise TypeError(
                f"LearnedOptimizer: {which} (shape {tuple(p.shape)}) has dtype {p.dtype} and "
                "a gradient; only floating-point and complex parameters can be stepped"
            )
        if p.grad.layout != torch.strided:  # COO, CSR, ...
            raise RuntimeError(
                f"LearnedOptimizer: {which} (shape {tuple(p.shape)}) has a sparse gradient "
                f"({p.grad.layout}); LearnedOptimizer does not support sparse gradients, use dense "
                "gradients (e.g. nn.Embedding(sparse=False))"
            )
        if p.grad.shape != p.shape:
            raise RuntimeError(
                f"LearnedOptimizer: {which} has gradient shape {tuple(p.grad.shape)}, which does not match "
                f"its shape {tuple(p.shape)}"
            )

    def _is_state_creation_step(self) -> bool:
        """lr 0 in every group and every gradient all zeros. The zero check is a host sync:
        run eagerly in a compiled step (a float lr of 0 is rare enough for the graph break),
        never while a CUDA graph captures."""
        lrs = [g["lr"] for g in self.param_groups]
        if any(isinstance(lr, Tensor) for lr in lrs):
            if _tracing_or_capturing():
                return False  # reading a tensor lr would break every compiled step's graph
        elif any(not isinstance(lr, (int, float)) or lr != 0 for lr in lrs):
            return False
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return False
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads or any(g.device.type == "meta" or g.is_sparse for g in grads):
            return False
        all_zero = _EAGER_IN_GRAPH["all_zero"]
        return all_zero(lrs) and all_zero(grads)

    def _adopt_global_copies(self) -> None:
        """Take the global state's copy that a loader other than ``load_state_dict`` (e.g.
        ZeroRedundancyOptimizer's) put into a parameter's state, as ``load_state_dict`` would:
        from the first parameter holding one, whether or not it has a gradient now."""
        if not self._hierarchical:
            return
        copies = []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and any(isinstance(k, str) and k.startswith(GLOBAL_PREFIX) for k in state):
                    keys = [k for k in state if isinstance(k, str) and k.startswith(GLOBAL_PREFIX)]
                    copies.append({k[len(GLOBAL_PREFIX) :]: state.pop(k) for k in keys})
        if not copies or self._global_state is None:
            return
        self._check_state_shapes("rule_global_state", copies[0], self.rule.global_state_spec(), rows=None)
        device = next(iter(self._global_state.values())).device
        for key, value in copies[0].items():
            self._global_state[key].copy_(value.to(device=device, dtype=self.state_dtype))

    def _state_as_rows(self, p: Tensor, index: int, state: dict, rule_state: dict[str, Tensor]) -> dict[str, Tensor]:
        """``rule_state`` as one row per coordinate. State written into ``self.state`` directly
        in ``state_dict()``'s layout, shaped like the parameter (ZeroRedundancyOptimizer's
        ``load_state_dict`` does this), is reshaped in place of the saved tensors."""
        name, first = next(iter(rule_state.items()))
        if first.dim() == 1 + len(self._state_trailing.get(name, first.shape[1:])):
            return rule_state  # already rows (one dimension check: the common case costs nothing)
        for name, value in list(rule_state.items()):
            trailing = self._state_trailing.get(name, value.shape[1:])
            rows = whole_tensor_state(value, p, trailing, f"state of parameter {index} ({STATE_PREFIX + name!r})")
            state[STATE_PREFIX + name] = rule_state[name] = rows
        return rule_state

    def _any_param_state(self) -> bool:
        """Whether any parameter of the groups has state. Reached through param_groups, not by
        iterating self.state: torch.compile guards a param met as a state key by its grad, and
        recompiled every step once zero_grad() freed that grad."""
        return any(p in self.state and self.state[p] for group in self.param_groups for p in group["params"])

    def __repr__(self) -> str:
        """torch's listing of the param groups, headed by the rule and how it runs."""
        config = ", ".join(f"{k}={v!r}" for k, v in self.rule.config.items())
        rule = f"{self.rule.rule_type}({config})"
        head = f"LearnedOptimizer (rule: {rule}, impl: {self.impl!r}, state_dtype: {self.state_dtype}"
        groups = super().__repr__().split("\n", 1)[1]
        # The fingerprint names the rule for checkpoints; the head already names it for people.
        groups = "\n".join(line for line in groups.split("\n") if not line.strip().startswith(RULE_FINGERPRINT_KEY))
        return head + "\n" + groups

    # ------------------------------------------------------------------ checkpoints
    @contextlib.contextmanager
    def _hooks_held(self, *names: str) -> Iterator[list[OrderedDict]]:
        """Torch's hook dicts ``names``, detached while ``Optimizer.state_dict`` /
        ``load_state_dict`` run: ours add the rule's entries around those calls, and the user's
        hooks must see them (a pre-hook rewrites what is loaded, a post-hook sees the result)."""
        held = [getattr(self, name) for name in names]
        for name in names:
            setattr(self, name, OrderedDict())
        try:
            yield held
        finally:
            for name, hooks in zip(names, held, strict=True):
                setattr(self, name, hooks)  # the same dicts: the hooks' handles still remove them

    def state_dict(self) -> dict[str, Any]:
        """The usual optimizer state plus the rule (type, config, weights) for exact resume.

        State-dict post-hooks run last, on the whole dict (``"rule"`` entries included).
        """
        self._adopt_global_copies()  # loaded by ZeroRedundancyOptimizer, saved again before a step
        with self._hooks_held("_optimizer_state_dict_post_hooks") as (post_hooks,):
            sd = super().state_dict()
        sd["rule"] = self._rule_entry()
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in enumerate(params):
            if i in sd["state"]:
                # Laid out as the parameter is (a DTensor's as a DTensor): the layout
                # torch.distributed.checkpoint saves and reshards, whatever the model's sharding.
                shaped = sharded_state if is_dtensor(p) else parameter_shaped_state
                sd["state"][i] = {
                    k: shaped(v, p) if self._is_coordinate_key(k) and isinstance(v, Tensor) else v
                    for k, v in sd["state"][i].items()
                }
        if self._global_state is not None:
            global_state = self._global_state
            if not self._any_param_state():
                # After opt.state.clear() the next step starts the global state afresh (see
                # step()); save what it will start from, not the values from before the reset.
                global_state = self._fresh_global_state(next(iter(global_state.values())).device)
            sd["rule_global_state"] = {k: v.detach().clone() for k, v in global_state.items()}
            # Also in the first parameter's state: tools that keep only "state" and
            # "param_groups" (torch.distributed.checkpoint, ZeroRedundancyOptimizer) keep it there.
            # (Keys in parameter order; other keys that torch allows in state are left alone.)
            count = sum(len(group["params"]) for group in self.param_groups)
            first = next((i for i in range(count) if i in sd["state"]), None)
            if first is not None:
                sd["state"][first] = {  # a new dict: Optimizer.state_dict() hands out our live ones
                    **sd["state"][first],
                    **{GLOBAL_PREFIX + k: v.detach().clone() for k, v in global_state.items()},
                }
        # Rule state is per coordinate: a same-sized parameter of another shape would take it silently.
        sd["param_shapes"] = [list(p.shape) for group in self.param_groups for p in group["params"]]
        # Names the rule where only the param groups survive (torch.distributed.checkpoint),
        # so that such a dict can be loaded into an optimizer built with the same rule.
        fingerprint = rule_fingerprint(self.rule)
        for group in sd["param_groups"]:
            group[RULE_FINGERPRINT_KEY] = fingerprint
        for hook in post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict``; the rule's state is cast to this optimizer's ``state_dtype``
        (not to the parameter's dtype, as ``torch.optim`` would).

        Everything is checked before anything changes: the rule (type, config, weight shapes)
        and every parameter's rule state (keys, one row per coordinate) must fit this optimizer.
        Load pre-hooks run first and may rewrite the whole dict; post-hooks run last, once the
        rule, its state and its global state are loaded.
        """
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = dict(result)
        _check_state_layout(state_dict)
        rule_sd = state_dict.pop("rule", None)
        global_sd = state_dict.pop("rule_global_state", None)
        saved_shapes = state_dict.pop("param_shapes", None)
        fingerprints = set()
        if isinstance(state_dict.get("param_groups"), list):
            groups = [dict(g) if isinstance(g, dict) else g for g in state_dict["param_groups"]]
            for group in groups:
                if isinstance(group, dict) and RULE_FINGERPRINT_KEY in group:
                    fingerprints.add(group.pop(RULE_FINGERPRINT_KEY))
            state_dict["param_groups"] = groups
        if not isinstance(rule_sd, dict) and fingerprints:
            # Only "state" and "param_groups" came through (torch.distributed.checkpoint): the
            # groups say which rule it was saved with; ours must be that one.
            if fingerprints != {rule_fingerprint(self.rule)}:
                raise ValueError(
                    "optimizer state_dict was saved with a different update rule than this optimizer's "
                    f"({self.rule.rule_type} {self.rule.config}): its param groups carry another "
                    f"{RULE_FINGERPRINT_KEY!r}; build the optimizer with the same `pretrained` rule before loading"
                )
            rule_sd = self._rule_entry()
        if not isinstance(rule_sd, dict):
            ours = any(
                isinstance(values, dict) and any(str(k).startswith(STATE_PREFIX) for k in values)
                for values in (state_dict.get("state") or {}).values()
            )
            if ours:  # our per-parameter state without the entries state_dict() adds
                raise ValueError(
                    "LearnedOptimizer state_dict without its 'rule' entry and without the rule's "
                    f"{RULE_FINGERPRINT_KEY!r} in its param groups, so which rule it belongs to is unknown "
                    "(torch.distributed.checkpoint keeps the fingerprint in the param groups, flattened or "
                    "not; a tool that drops param-group entries, or flattened checkpoints of earlier "
                    "versions of this library, lose it). Save and load optimizer.state_dict() itself, or "
                    "use get/set_optimizer_state_dict"
                )
            raise ValueError(
                "not a LearnedOptimizer state_dict: it has no 'rule' entry (was it saved by another optimizer?)"
            )
        if rule_sd.get("rule_type") != self.rule.rule_type or not same_config(rule_sd.get("config"), self.rule.config):
            raise ValueError(
                "optimizer state_dict was saved with a different update rule "
                f"({rule_sd.get('rule_type')} {rule_sd.get('config')}) than this optimizer's "
                f"({self.rule.rule_type} {self.rule.config}); build the optimizer with the "
                "same `pretrained` rule before loading"
            )
        self._check_rule_weights(rule_sd.get("weights"))
        saved_state, global_copy = self._split_global_copies(state_dict.get("state", {}))
        state_dict["state"] = saved_state
        if global_sd is None:
            global_sd = global_copy
        # Empty where the groups do not match: Optimizer.load_state_dict raises for that below.
        index_to_param = self._saved_index_to_param(state_dict) or {}
        for idx, values in saved_state.items():
            if idx in index_to_param and isinstance(values, dict):
                saved_state[idx] = self._rows_of_saved_state(idx, index_to_param[idx], values)
        for idx, values in saved_state.items():
            if idx in index_to_param:
                if any(str(k).startswith(STATE_PREFIX) for k in values):
                    self._check_saved_param_shape(idx, index_to_param[idx], saved_shapes)
                self._check_saved_param_state(idx, index_to_param[idx], values)
        for group in state_dict.get("param_groups") or ():
            if isinstance(group, dict):  # a NaN or negative lr would step silently wrong
                # No small-lr warning: a checkpoint's lr is most often one a scheduler decayed.
                _check_group_options(
                    {k: v for k, v in group.items() if k in ("lr", "weight_decay", "maximize")}, warn_small_lr=False
                )
        if global_sd is not None:
            self._check_state_shapes("rule_global_state", global_sd, self.rule.global_state_spec(), rows=None)
        elif self._global_state is not None and any(
            isinstance(values, dict) and any(str(k).startswith(STATE_PREFIX) for k in values)
            for values in saved_state.values()
        ):
            # Stepped state without the global state it was stepped with: resuming would pair
            # them with a fresh global state, a silently different run.
            raise ValueError(
                f"optimizer state_dict: per-parameter state of {self.rule.rule_type} without its global "
                "state ('rule_global_state', or its copy in the first parameter's state); was it "
                "filtered by a tool that keeps only some entries? (torch.distributed.checkpoint's "
                "flatten_optimizer_state_dict=True drops it: for a rule with global state, save "
                "without flattening)"
            )
        # Optimizer.load_state_dict casts float state to the parameter dtype; ours is restored below.
        # The hooks already ran (pre) or run at the end (post), not inside it.
        hook_names = ("_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")
        with self._hooks_held(*hook_names) as (_, post_hooks):
            super().load_state_dict(state_dict)  # checks the param groups before changing anything
        for group in self.param_groups:
            group.setdefault("momentum", 0.0)  # state_dicts saved before the placeholder existed
        self._name_rule_in_groups()
        for idx, values in saved_state.items():
            p = index_to_param.get(idx)
            if p is None:
                continue
            for key, value in values.items():
                if key.startswith(STATE_PREFIX) and isinstance(value, Tensor):
                    # In this optimizer's state_dtype, as fresh state would be: one dtype for
                    # all rule state, which the fused kernels need (float32 / bfloat16 only).
                    self.state[p][key] = value.detach().to(device=p.device, dtype=self.state_dtype, copy=True)
        self.rule.load_state_dict(rule_sd["weights"])
        self._rule_copies.clear()
        device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
        if global_sd is not None:
            self._global_state = {
                k: v.detach().to(device=device, dtype=self.state_dtype, copy=True) for k, v in global_sd.items()
            }
        elif self._hierarchical:
            # Saved before any step: like the per-parameter state, the global state starts afresh
            # (keeping ours would pair fresh tensor states with a stale global state).
            self._global_state = self._fresh_global_state(device)
        for hook in post_hooks.values():
            hook(self)

    def _rule_entry(self) -> dict[str, Any]:
        """The ``"rule"`` entry of a state_dict: type, config and a copy of the weights."""
        return {
            "rule_type": self.rule.rule_type,
            "config": dict(self.rule.config),
            "weights": {k: v.detach().clone() for k, v in self.rule.state_dict().items()},
        }

    @staticmethod
    def _split_global_copies(saved_state: Any) -> tuple[Any, dict[str, Any] | None]:
        """``saved_state`` without the global state's copies (``GLOBAL_PREFIX`` keys), and the
        copy of the first parameter met holding one (``state_dict`` puts it in exactly one)."""
        if not isinstance(saved_state, dict):
            return saved_state, None
        stripped, copies = {}, []
        for idx, values in saved_state.items():
            if isinstance(values, dict) and any(str(k).startswith(GLOBAL_PREFIX) for k in values):
                copies.append(
                    {k[len(GLOBAL_PREFIX) :]: v for k, v in values.items() if str(k).startswith(GLOBAL_PREFIX)}
                )
                values = {k: v for k, v in values.items() if not str(k).startswith(GLOBAL_PREFIX)}
            stripped[idx] = values
        return stripped, (copies[0] if copies else None)

    def _check_rule_weights(self, weights: Any) -> None:
        ours = self.rule.state_dict()
        if not isinstance(weights, dict):
            raise ValueError("optimizer state_dict: 'rule' has no 'weights' dict")
        missing, unexpected = sorted(set(ours) - set(weights)), sorted(set(weights) - set(ours))
        if missing or unexpected:
            raise ValueError(f"optimizer state_dict: rule weights missing {missing}, unexpected {unexpected}")
        for name, value in weights.items():
            if not isinstance(value, Tensor) or value.shape != ours[name].shape:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"optimizer state_dict: rule weight {name!r} has shape {shape}, expected {tuple(ours[name].shape)}"
                )
            # The checks a weight file gets (learned_optim.weights.load_from_files).
            if ours[name].is_floating_point() and not value.is_floating_point():
                raise ValueError(f"optimizer state_dict: rule weight {name!r} has dtype {value.dtype}, expected floats")
            if value.is_floating_point() and not torch.isfinite(value.to(ours[name].dtype)).all():
                raise ValueError(
                    f"optimizer state_dict: rule weight {name!r} holds non-finite values (NaN or inf) "
                    f"in {ours[name].dtype}"
                )

    def _saved_index_to_param(self, state_dict: dict[str, Any]) -> dict[Any, Tensor] | None:
        """Saved parameter index -> our parameter, or None where the groups do not match (then
        ``Optimizer.load_state_dict`` raises its own error)."""
        saved_groups = state_dict.get("param_groups")
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups):
            return None
        mapping = {}
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            if len(saved.get("params", ())) != len(group["params"]):
                return None
            mapping.update(zip(saved["params"], group["params"], strict=True))
        return mapping

    @staticmethod
    def _check_saved_param_shape(idx: Any, p: Tensor, saved_shapes: Any) -> None:
        """The parameter saved as ``idx`` had ``p``'s shape (state_dicts saved before shapes were
        recorded are not checked)."""
        if saved_shapes is None:
            return
        if not isinstance(saved_shapes, list) or not isinstance(idx, int) or not 0 <= idx < len(saved_shapes):
            raise ValueError("optimizer state_dict: 'param_shapes' must list one shape per parameter")
        shape = saved_shapes[idx]
        if not isinstance(shape, (list, tuple)) or not all(type(n) is int for n in shape):
            raise ValueError(f"optimizer state_dict: 'param_shapes'[{idx}] is {shape!r}, expected a list of ints")
        if list(shape) != list(p.shape):
            raise ValueError(
                f"optimizer state_dict: parameter {idx} was saved with shape {tuple(saved_shapes[idx])}, "
                f"this optimizer's has shape {tuple(p.shape)}: its per-coordinate rule state would land on "
                "the wrong coordinates"
            )

    @staticmethod
    def _is_coordinate_key(key: object) -> bool:
        """Whether a parameter's state key holds per-coordinate rule state."""
        return isinstance(key, str) and key.startswith(STATE_PREFIX) and not key.startswith(SEGMENT_PREFIX)

    def _rows_of_saved_state(self, idx: Any, p: Tensor, values: dict[str, Any]) -> dict[str, Any]:
        """A parameter's saved per-coordinate state as the rows this optimizer keeps for it: a
        DTensor's local shard, a whole tensor's shard for a DTensor parameter, and state shaped
        like the parameter (gathered from a DTensor) reshaped to one row per coordinate."""
        spec = self.rule.state_spec()
        rows = {}
        for key, value in values.items():
            name = key[len(STATE_PREFIX) :] if self._is_coordinate_key(key) else None
            if name in spec and isinstance(value, Tensor):
                trailing = tuple(spec[name])
                where = f"state of parameter {idx} ({key!r})"
                value = (
                    local_state(value, p, trailing, where)
                    if is_dtensor(p)
                    else whole_tensor_state(value, p, trailing, where)
                )
            rows[key] = value
        return rows

    def _check_saved_param_state(self, idx: Any, p: Tensor, values: dict[str, Any]) -> None:
        """A parameter's saved state must be what this rule keeps for a tensor of its size."""
        if not any(k.startswith(STATE_PREFIX) for k in values):
            return  # no state saved for it: it starts afresh
        per_tensor = {k[len(SEGMENT_PREFIX) :]: v for k, v in values.items() if k.startswith(SEGMENT_PREFIX)}
        per_coordinate = {
            k[len(STATE_PREFIX) :]: v
            for k, v in values.items()
            if k.startswith(STATE_PREFIX) and not k.startswith(SEGMENT_PREFIX)
        }
        numel = local_coordinates(p).numel()  # a DTensor's: its shard's
        where = f"state of parameter {idx} (shape {tuple(p.shape)})"
        self._check_state_shapes(where, per_coordinate, self.rule.state_spec(), rows=numel)
        self._check_state_shapes(where, per_tensor, self.rule.segment_state_spec(), rows=1, prefix="segment.")

    def _check_state_shapes(
        self, where: str, values: dict[str, Any], spec: dict[str, tuple[int, ...]], rows: int | None, prefix: str = ""
    ) -> None:
        if set(values) != set(spec):
            raise ValueError(
                f"optimizer state_dict: {where} has rule state {sorted(prefix + k for k in values)}, "
                f"expected {sorted(prefix + k for k in spec)}"
            )
        for name, shape in spec.items():
            value = values[name]
            expected = tuple(shape) if rows is None else (rows, *shape)
            if not isinstance(value, Tensor) or tuple(value.shape) != expected:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"optimizer state_dict: {where}: {prefix}{name!r} has shape {got}, expected {expected}"
                )
            if not value.is_floating_point():
                raise ValueError(
                    f"optimizer state_dict: {where}: {prefix}{name!r} has dtype {value.dtype}, expected a float dtype"
                )
            if not torch.isfinite(value.to(self.state_dtype)).all():
                # A step never leaves non-finite state (it skips such updates): this one would
                # turn the parameters into NaN. Checked as it will be kept: 1e300 is inf in float32.
                raise ValueError(f"optimizer state_dict: {where}: {prefix}{name!r} holds non-finite values")

    @property
    def rule_class(self) -> type[UpdateRule]:
        """Class of the update rule in use (a subclass as such, registered or not)."""
        return type(self.rule)
