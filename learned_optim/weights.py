"""Saving and loading update rules: ``config.json`` + ``model.safetensors``, nothing else.

``config.json`` holds ``{"format": "learned_optim.rule", "format_version": 1,
"rule_type": <registered name>, "config": {<constructor arguments>}}`` (plus free-form
``"metadata"`` and ``"weights_sha256"``, the hash of the weights file it was saved with,
checked on load where present); ``model.safetensors`` holds the rule's ``state_dict``.
Loading never executes code from the files: the rule type must be one this library registers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as serialize_tensors
from torch import Tensor

from learned_optim._files import write_files
from learned_optim._warnings import user_stacklevel
from learned_optim.rules.base import UpdateRule
from learned_optim.rules.registry import RULE_TYPES, get_rule_class

__all__ = [
    "CONFIG_NAME",
    "DEFAULT_RULE",
    "MODEL_CARD_NAME",
    "WEIGHTS_NAME",
    "PretrainedError",
    "bundled_dir",
    "check_savable",
    "list_pretrained",
    "load_from_directory",
    "load_from_files",
    "load_rule",
    "resolve_rule",
    "save_pretrained",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_CARD_NAME = "README.md"
FORMAT_NAME = "learned_optim.rule"
FORMAT_VERSION = 1
WEIGHTS_HASH_KEY = "weights_sha256"
PREVIOUS_RULE_MARKER = "PREVIOUS_RULE.txt"
"""Written by ``learned-optim meta-fit --overwrite`` into a folder that holds an earlier rule, and
removed once the run saves its own: while it is there, the folder's rule is the earlier run's
(loading it warns)."""
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""Dtypes a weights file may store (loaded into the rule's own dtype)."""
# The rule LearnedOptimizer uses when no `pretrained` is given.
DEFAULT_RULE = "lstm-mnist-mixed-momentum"


class PretrainedError(ValueError):
    """A rule's files are missing, malformed or disagree with each other."""


def bundled_dir() -> Path:
    """Directory of the rules installed with the package (top-level ``pretrained/``)."""
    try:
        root = resources.files("learned_optim.pretrained")
        path = Path(str(root))
        if path.is_dir():
            return path
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "pretrained"


def list_pretrained() -> list[str]:
    """Names of the bundled rules, usable as ``LearnedOptimizer(..., pretrained=name)``."""
    root = bundled_dir()
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if d.is_dir() and (d / CONFIG_NAME).is_file())


def check_savable(rule: UpdateRule) -> None:
    """Raise ``ValueError`` unless ``rule`` saved now would load back as the same class and config.

    Loading rebuilds ``RULE_TYPES[rule.rule_type](**config)``, so the rule's class must be the
    one registered under its ``rule_type`` (a subclass that only inherits its parent's name
    would load back as the parent, without its changes), and ``config`` must hold exactly the
    constructor's arguments, as JSON values the constructor accepts, that build weights of the
    rule's names and shapes (else the load fails, long after the save).
    """
    if not isinstance(rule, UpdateRule):
        raise TypeError(f"save_pretrained expects an UpdateRule, got {type(rule).__name__}")
    cls = type(rule)
    name = rule.rule_type
    if not name:
        raise ValueError(f"{cls.__qualname__} has no rule_type: set the class attribute rule_type = '<name>'")
    registered = RULE_TYPES.get(name)
    # Same module and name: the class was redefined (a re-run notebook cell) since the rule was made.
    if registered is None or (registered.__module__, registered.__qualname__) != (cls.__module__, cls.__qualname__):
        loads_as = "nothing (it is not registered)" if registered is None else registered.__qualname__
        raise ValueError(
            f"{cls.__qualname__} has rule_type {name!r}, which would load back as {loads_as}; "
            f"give {cls.__qualname__} its own rule_type (class attribute) so that it is registered"
        )
    if not isinstance(rule.config, dict):
        raise ValueError(f"{cls.__qualname__}.config must be a dict of constructor arguments")
    expected = cls.config_keys()
    missing = [k for k in expected if k not in rule.config]
    unexpected = sorted(set(rule.config) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{cls.__qualname__}.config must hold exactly the constructor's arguments {expected} "
            f"(loading calls {cls.__qualname__}(**config)): missing {missing}, unexpected {unexpected}"
        )
    _check_config_rebuilds(rule)


def _check_config_rebuilds(rule: UpdateRule) -> None:
    """Raise ``ValueError`` unless ``type(rule)(**config)``, with the config as JSON gives it
    back, builds a rule with the same weight names and shapes (built on the meta device)."""
    cls = type(rule)
    try:
        config = json.loads(json.dumps(rule.config, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{cls.__qualname__}.config must hold plain JSON values ({err})") from None
    try:
        skeleton = _expected_tensors(cls, config, "its config")  # what loading will build
    except PretrainedError as err:
        raise ValueError(f"{cls.__qualname__}.config would not load back: {err}") from None
    if skeleton is None:  # a constructor that cannot run on meta tensors: nothing to compare
        return
    built = {name: tuple(t.shape) for name, t in skeleton.items()}
    ours = {name: tuple(t.shape) for name, t in rule.state_dict().items()}
    if built != ours:
        differ = sorted(
            f"{name}: {ours.get(name, 'absent')} here, {built.get(name, 'absent')} from the config"
            for name in set(built) | set(ours)
            if built.get(name) != ours.get(name)
        )
        raise ValueError(
            f"{cls.__qualname__}.config does not describe this rule's weights (was it changed after the "
            f"rule was built?): {'; '.join(differ[:5])}{' …' if len(differ) > 5 else ''}"
        )


def save_pretrained(
    rule: UpdateRule,
    save_directory: str | os.PathLike[str],
    model_card: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``rule`` to ``save_directory`` as ``config.json`` + ``model.safetensors``.

    Everything is checked and serialised first (a rule that would not load back as itself, see
    :func:`check_savable`, non-finite weights, a state_dict entry that is not floating point
    (the file stores float32), an empty ``save_directory`` string, or a config or ``metadata``
    that is not plain JSON raises ``ValueError``; a ``model_card`` that is not a str or
    ``metadata`` that is not a dict ``TypeError``; a ``save_directory`` that is a file
    ``FileExistsError``, all before any file changes), then
    both files are written to temporary names and only then renamed, so an interrupted save
    does not leave a half-written rule where a good one was.
    """
    check_savable(rule)
    if isinstance(save_directory, str) and not save_directory.strip():
        # Path("") is the working directory: an unset setting must not write (e.g. over a
        # project's config.json) there; loading "" is refused for the same reason.
        raise ValueError(
            f"save_pretrained: save_directory is an empty string {save_directory!r}; pass a folder "
            "(e.g. '.' for the working directory)"
        )
    if model_card is not None and not isinstance(model_card, str):
        raise TypeError(f"save_pretrained: model_card must be a str (README.md text), got {type(model_card).__name__}")
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"save_pretrained: metadata must be a dict, got {type(metadata).__name__}")
    directory = Path(save_directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"save_pretrained: {str(directory)!r} exists and is not a folder")
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "rule_type": rule.rule_type,
        "config": dict(rule.config),
    }
    if metadata:
        config["metadata"] = metadata
    state = rule.state_dict()
    # The file stores float32 only: an int64 counter above 2**24 would round, silently.
    not_float = [f"{name} ({tensor.dtype})" for name, tensor in state.items() if not tensor.is_floating_point()]
    if not_float:
        raise ValueError(
            f"save_pretrained: the rule's state_dict entries {not_float} are not floating point; rule files "
            "store float32 tensors only, which would not keep their values exactly. Register such a buffer "
            "with persistent=False (rebuilt by the constructor), or store it as a float"
        )
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    nonfinite = [name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()]
    if nonfinite:
        # Such a file would be refused on load: better no file than one that cannot be read back.
        raise ValueError(f"save_pretrained: the rule's weights {nonfinite} hold non-finite values (NaN or inf)")
    # Serialised in memory and written by us: safetensors' save_file creates 0600 files.
    payload = serialize_tensors(tensors, metadata={"format": "pt"})
    # Ties the config to these weights: a save cut off between the two renames below leaves
    # new weights beside the old config, which loading then refuses instead of mixing them.
    config[WEIGHTS_HASH_KEY] = hashlib.sha256(payload).hexdigest()
    try:
        config_text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        raise ValueError(f"save_pretrained: metadata and config must be plain JSON values ({err})") from None
    files = {WEIGHTS_NAME: payload, CONFIG_NAME: config_text.encode()}
    if model_card is not None:
        files[MODEL_CARD_NAME] = model_card.encode()
    directory.mkdir(parents=True, exist_ok=True)
    write_files(directory, files)
    return directory


def _read_config(config_path: str | os.PathLike[str]) -> tuple[type[UpdateRule], dict[str, Any], str | None]:
    """Parse and validate a ``config.json``: the rule class, its arguments, and the SHA-256 of the
    weights file the config was saved with (None for files written before it was recorded)."""
    path = Path(config_path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise PretrainedError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PretrainedError(f"{path}: not valid JSON ({err})") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise PretrainedError(f"{path}: cannot be read as JSON ({err})") from None
    except RecursionError:
        raise PretrainedError(f"{path}: not a rule config (JSON nested too deeply to read)") from None
    except OSError as err:  # a directory, no permission, ...
        raise PretrainedError(f"{path}: cannot be read ({err.strerror or err})") from None
    if not isinstance(raw, dict):
        raise PretrainedError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("format", FORMAT_NAME) != FORMAT_NAME:
        raise PretrainedError(f"{path}: format {raw.get('format')!r} is not {FORMAT_NAME!r}")
    version = raw.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise PretrainedError(f"{path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise PretrainedError(
            f"{path}: format_version {version!r} is newer than this library reads "
            f"({FORMAT_VERSION}); upgrade learned_optim"
        )
    if "rule_type" not in raw:
        raise PretrainedError(f"{path}: missing key 'rule_type'")
    if not isinstance(raw["rule_type"], str):  # a list or dict would crash the registry lookup
        raise PretrainedError(f"{path}: 'rule_type' must be a string, got {raw['rule_type']!r}")
    try:
        cls = get_rule_class(raw["rule_type"])
    except ValueError as err:
        raise PretrainedError(f"{path}: {err}") from None
    config = raw.get("config")
    if not isinstance(config, dict):
        raise PretrainedError(f"{path}: 'config' must be a JSON object of {cls.__name__} arguments")
    expected = set(cls.config_keys())
    missing = sorted(expected - set(config) - cls.added_config_keys)
    extra = sorted(set(config) - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing config keys {missing}")
        if extra:
            parts.append(f"unexpected config keys {extra}")
        raise PretrainedError(f"{path}: {'; '.join(parts)} for rule type {cls.rule_type!r}")
    # Saved before a key existed: the behaviour it was saved with.
    config = {**{k: v for k, v in cls.legacy_config_values.items() if k not in config}, **config}
    weights_hash = raw.get(WEIGHTS_HASH_KEY)
    if weights_hash is not None and not (isinstance(weights_hash, str) and re.fullmatch(r"[0-9a-f]{64}", weights_hash)):
        raise PretrainedError(f"{path}: {WEIGHTS_HASH_KEY!r} must be a SHA-256 hex digest, got {weights_hash!r}")
    return cls, config, weights_hash


def load_from_directory(directory: str | os.PathLike[str]) -> UpdateRule:
    """Build a rule from a directory with ``config.json`` and ``model.safetensors``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PretrainedError(f"{directory}: not a directory")
    rule = load_from_files(directory / CONFIG_NAME, directory / WEIGHTS_NAME)
    if (directory / PREVIOUS_RULE_MARKER).is_file():
        # Loadable on purpose (a cut-off --overwrite run must not cost the good rule), but
        # not to be taken for the new run's result.
        warnings.warn(
            f"{directory}: this is the rule of an earlier run; a `learned-optim meta-fit --overwrite` into "
            f"this folder has not saved its own yet (see {directory / PREVIOUS_RULE_MARKER})",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    return rule


def _expected_tensors(cls: type[UpdateRule], config: dict[str, Any], config_path: Any) -> dict[str, Tensor] | None:
    """The rule's state_dict built on the meta device (no memory), or None if it cannot be.

    The sizes come from a file that may have been downloaded: a config asking for a huge
    network must fail on the tensor shapes, not allocate gigabytes before they are compared.
    """
    try:
        with torch.device("meta"), torch.random.fork_rng(devices=[]):
            skeleton = cls(**config)
    except (TypeError, ValueError) as err:
        raise PretrainedError(f"{config_path}: invalid config for {cls.__name__}: {err}") from None
    except Exception:  # a constructor that cannot run on meta tensors: check after building
        return None
    return skeleton.state_dict()


def load_from_files(config_path: str | os.PathLike[str], weights_path: str | os.PathLike[str]) -> UpdateRule:
    """Build a rule from a config file and a safetensors file, validating both.

    The file's tensor names and shapes are checked against the config (built on the meta
    device) from the safetensors header, before any tensor or the rule is allocated.
    """
    cls, config, weights_hash = _read_config(config_path)
    expected = _expected_tensors(cls, config, config_path)
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        what = "is a folder, not a file" if weights_path.is_dir() else "file not found"
        raise PretrainedError(f"{weights_path}: {what}")
    other_save = None if weights_hash is None else _other_save(weights_path, weights_hash, config_path)
    try:
        rule = _load_checked(cls, config, expected, weights_path, config_path)
    except PretrainedError as err:
        if other_save is None:
            raise
        # What went wrong in the file, and why: weights of another save than the config's.
        raise PretrainedError(f"{err}. {other_save}") from None
    if other_save is not None:
        raise PretrainedError(other_save)
    return rule


def _load_checked(
    cls: type[UpdateRule],
    config: dict[str, Any],
    expected: dict[str, Tensor] | None,
    weights_path: Path,
    config_path: Any,
) -> UpdateRule:
    """Check the weights file against ``expected`` (the rule's meta state_dict, or None), build
    the rule from ``config`` and load the weights into it."""
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise PretrainedError(f"{weights_path}: not a valid safetensors file ({err})") from None
    if expected is not None:
        _check_header(weights_path, cls, expected, shapes)
    try:
        # The random initial weights are overwritten below: drawing them must not move the
        # caller's global RNG (swapping Adam for LearnedOptimizer would change later draws).
        with torch.random.fork_rng(devices=[]), _float32_default():
            rule = cls(**config)
    except (TypeError, ValueError, RuntimeError, MemoryError) as err:
        # RuntimeError / MemoryError: sizes too large to allocate (or even to count).
        raise PretrainedError(f"{config_path}: invalid config for {cls.__name__}: {err}") from None
    if expected is None:
        _check_header(weights_path, cls, rule.state_dict(), shapes)
    expected = rule.state_dict()
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise PretrainedError(f"{weights_path}: not a valid safetensors file ({err})") from None
    for name, tensor in tensors.items():
        if tensor.dtype not in WEIGHT_DTYPES:
            raise PretrainedError(
                f"{weights_path}: tensor {name!r} has dtype {tensor.dtype}, expected one of {WEIGHT_DTYPES}"
            )
        # Checked after the cast: a float64 value beyond float32's range would load as inf.
        tensors[name] = tensor = tensor.to(expected[name].dtype)
        if not torch.isfinite(tensor).all():
            raise PretrainedError(
                f"{weights_path}: tensor {name!r} holds non-finite values (in {expected[name].dtype})"
            )
    rule.load_state_dict(tensors)
    return rule


def _other_save(weights_path: Path, weights_hash: str, config_path: Any) -> str | None:
    """Why the weights file is not the one the config was saved with, or None if it is."""
    try:
        actual = hashlib.sha256(weights_path.read_bytes()).hexdigest()
    except OSError as err:
        raise PretrainedError(f"{weights_path}: cannot be read ({err.strerror or err})") from None
    if actual == weights_hash:
        return None
    return (
        f"{weights_path}: not the weights {config_path} was saved with (its {WEIGHTS_HASH_KEY!r} differs): "
        "the two files come from different saves (one cut off, or a file copied over). To pair these "
        f"weights with that config on purpose, delete the {WEIGHTS_HASH_KEY!r} entry from the config"
    )


@contextlib.contextmanager
def _float32_default() -> Iterator[None]:
    """Build a loaded rule in float32, whatever ``torch.set_default_dtype`` says: its weights
    are stored in float32 and the fused kernels take float32 rules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _check_header(
    weights_path: Path,
    cls: type[UpdateRule],
    expected: dict[str, Tensor],
    shapes: dict[str, tuple[int, ...]],
) -> None:
    """The file's tensor names and shapes against the rule's."""
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:

        def listed(label: str, names: list[str]) -> str:
            if not names:
                return ""
            more = f" and {len(names) - 8} more" if len(names) > 8 else ""
            return f" {label} {names[:8]}{more}"

        raise PretrainedError(
            f"{weights_path}: tensors do not match the config ({cls.rule_type}"
            f"{listed('missing', missing)}{listed('unexpected', extra)})"
        )
    for name, shape in shapes.items():
        if shape != tuple(expected[name].shape):
            raise PretrainedError(
                f"{weights_path}: tensor {name!r} has shape {shape}, the config implies {tuple(expected[name].shape)}"
            )


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or (os.sep in name and name.count("/") != 1) or "\\" in name


def check_download_flags(force_download: object, local_files_only: object) -> None:
    """Refuse non-bool or contradictory Hub download flags, wherever the name resolves."""
    for name, flag in (("force_download", force_download), ("local_files_only", local_files_only)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if force_download and local_files_only:
        raise ValueError("force_download=True and local_files_only=True contradict each other; pass one")


def resolve_rule(
    pretrained: str | os.PathLike[str] | UpdateRule,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    is_default: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
) -> UpdateRule:
    """Turn anything ``LearnedOptimizer(pretrained=...)`` accepts into an :class:`UpdateRule`.

    A ``str`` is a bundled name, then a local directory, then a Hub repo id; an
    ``os.PathLike`` (e.g. a ``pathlib.Path``) is always a local directory. ``revision``
    applies to Hub repo ids only: given with a name that resolves locally, it is an error
    rather than silently ignored. ``force_download`` and ``local_files_only`` are passed to
    the Hub download (see :func:`learned_optim.hub.download_rule`); a bundled rule or a local
    directory never touches the network, so they change nothing there.
    """
    check_download_flags(force_download, local_files_only)
    if isinstance(pretrained, UpdateRule):
        if revision is not None:
            raise PretrainedError(
                f"pretrained is a {type(pretrained).__name__} object, but revision={revision!r} applies only "
                "to Hugging Face Hub repo ids; drop revision"
            )
        return pretrained
    if isinstance(pretrained, torch.nn.Module):
        raise TypeError(
            f"pretrained must be an UpdateRule (e.g. learned_optim.CoordinateLSTM), got {type(pretrained).__name__}"
        )
    if not isinstance(pretrained, (str, os.PathLike)):
        hint = ""
        if isinstance(pretrained, (int, float)) and not isinstance(pretrained, bool):
            # LearnedOptimizer(params, 1e-3), copied from Adam(params, 1e-3).
            hint = (
                f" (the second argument is `pretrained`, not the learning rate: pass lr={pretrained} by keyword, "
                "and mind that lr multiplies the rule's update: 1.0 is the meta-trained step)"
            )
        raise TypeError(
            "pretrained must be a name, a directory, a Hub repo id or an UpdateRule, "
            f"got {type(pretrained).__name__}{hint}"
        )
    name = os.fspath(pretrained)
    is_path = not isinstance(pretrained, str)
    if not is_path and not name.strip():
        # Path("") is the working directory: an unset setting must not load what lies there.
        raise PretrainedError(
            f"pretrained is an empty string {name!r}; pass None for the default rule, a bundled name "
            f"({list_pretrained() or 'none'}), a directory (e.g. '.'), a Hub repo id or an UpdateRule"
        )
    bundled = list_pretrained()
    if not is_path and name in bundled:
        _no_revision(revision, name, "a bundled rule")
        if (Path(name) / CONFIG_NAME).is_file():
            # Bundled names come first; a user who saved a rule under the same name would
            # otherwise get ours without knowing.
            warnings.warn(
                f"pretrained={name!r} loads the bundled rule, not the folder {name!r} in the working "
                f"directory; pass pathlib.Path({name!r}) or './{name}' for that folder",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        return load_from_directory(bundled_dir() / name)
    if is_default:
        raise PretrainedError(
            f"the default rule {name!r} is not bundled with this installation. Bundled rules: "
            f"{bundled or 'none'}. Pass one with LearnedOptimizer(params, pretrained=<name>), or a "
            "local directory, a Hugging Face Hub repo id, or an UpdateRule instance"
        )
    path = Path(name).expanduser()
    if path.is_dir():
        _no_revision(revision, name, f"the local directory {str(path.resolve())!r}")
        return load_from_directory(path)
    if path.is_file():
        raise PretrainedError(
            f"{name!r} is a file, not a rule folder: pass the folder that holds {CONFIG_NAME} and "
            f"{WEIGHTS_NAME} ({str(path.parent)!r})"
        )
    if is_path or _looks_like_path(name) or path.exists():
        raise PretrainedError(f"{name!r}: no such directory (bundled rules: {bundled or 'none'})")
    if "/" not in name:
        raise PretrainedError(
            f"{name!r} is not a bundled rule (bundled: {bundled or 'none'}), a local directory, "
            "or a Hub repo id of the form 'owner/name'"
        )
    from learned_optim.hub import download_rule

    try:
        return download_rule(
            name,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            force_download=force_download,
            local_files_only=local_files_only,
        )
    except PretrainedError as err:
        # 'runs/A' may be a mistyped or not yet created folder, not meant for the Hub at all.
        try:
            cwd = os.getcwd()
        except OSError:  # the working directory was deleted
            cwd = "the working directory"
        raise PretrainedError(
            f"{err} ({name!r} was looked up on the Hub because there is no local folder of that name in {cwd})"
        ) from None


def _no_revision(revision: str | None, name: str, what: str) -> None:
    if revision is not None:
        raise PretrainedError(
            f"{name!r} is {what}, but revision={revision!r} applies only to Hugging Face Hub repo ids; "
            "drop revision to load it, or (for a Hub repo of the same name) run from a folder "
            "without such a directory"
        )


def load_rule(
    name_or_path: str | os.PathLike[str],
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
) -> UpdateRule:
    """Load a rule from a bundled name, a local directory or a Hugging Face Hub repo id.

    ``revision`` (branch, tag or commit), ``cache_dir``, ``token`` (for private repos; by
    default the logged-in token or ``HF_TOKEN``), ``force_download`` (fetch again even if
    cached) and ``local_files_only`` (the cache only, no network) apply to Hub repo ids.
    """
    return resolve_rule(
        name_or_path,
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        force_download=force_download,
        local_files_only=local_files_only,
    )
