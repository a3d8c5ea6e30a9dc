"""Building and running the fused CPU kernels (``*.c`` beside this file).

A kernel is plain C compiled on first use with the system's C compiler (``$CC``, else
``cc``/``gcc``/``clang``) into a per-user cache (``kernels/`` under ``$LEARNED_OPTIM_CACHE``,
else under ``$XDG_CACHE_HOME/learned_optim`` or ``~/.cache/learned_optim``), keyed by its
source, the shared header ``vecmath.h``, the compiler and the flags, and loaded with
``ctypes``, which releases the GIL during a call: :func:`split_ranges` and
:func:`run_parallel` split the coordinates over torch's intra-op thread count. Where no
compiler is found a kernel is unavailable and the rules run eagerly.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import secrets
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from learned_optim._warnings import user_stacklevel

__all__ = ["KernelLibrary", "run_parallel", "split_ranges"]

_HERE = Path(__file__).resolve().parent
_HEADERS = ("vecmath.h",)
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _cache_dir() -> Path | None:
    """Where built kernels are kept; ``None`` when no folder is named and there is no home
    (a container user without a passwd entry: ``~`` would become a folder in the cwd)."""
    root = os.environ.get("LEARNED_OPTIM_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME")
        if not base:
            home = os.path.expanduser("~")
            if home.startswith("~"):
                return None
            base = os.path.join(home, ".cache")
        root = os.path.join(base, "learned_optim")
    return Path(root) / "kernels"


def _compiler() -> list[str] | None:
    """The compiler command: ``$CC`` as the shell would split it (``"ccache gcc"``), else the first
    of ``cc``/``gcc``/``clang`` on the PATH."""
    cc = shlex.split(os.environ.get("CC", ""))
    for command in (cc, ["cc"], ["gcc"], ["clang"]):
        if command and shutil.which(command[0]):
            return command
    return None


def _flags() -> list[str]:
    flags = ["-O3", "-shared", "-fPIC", "-std=gnu11", f"-I{_HERE}"]
    # AVX2 + FMA where the CPU has them (torch reports what it dispatches to).
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


class KernelLibrary:
    """One C source, built and loaded on first use; ``configure`` sets the functions' ctypes signatures."""

    def __init__(self, source: str, configure: Callable[[ctypes.CDLL], None]) -> None:
        self.source = _HERE / source
        self.configure = configure
        self._library: ctypes.CDLL | None = None
        self.error: str | None = None

    def load(self) -> ctypes.CDLL | None:
        """The loaded library, or ``None`` (then :attr:`error` says why)."""
        if self._library is not None or self.error is not None:
            return self._library  # settled: no lock (torch.compile cannot trace one)
        with _lock:
            if self._library is not None or self.error is not None:
                return self._library
            compiler = _compiler()
            if compiler is None:
                self._fail("no C compiler found (install one, or set $CC)")
                return None
            flags = _flags()
            # The build flags hold this file's folder, which differs between installs: not part of the key.
            key_flags = [f for f in flags if not f.startswith("-I")]
            text = self.source.read_bytes() + b"".join((_HERE / h).read_bytes() for h in _HEADERS)
            key = hashlib.sha256(text + " ".join([*compiler, *key_flags]).encode()).hexdigest()[:16]
            cache = _cache_dir()
            private = None
            try:
                if cache is None:  # no home: a private folder for this process, gone once loaded
                    cache = private = Path(tempfile.mkdtemp(prefix="learned_optim-kernels-"))
                target = cache / f"{self.source.stem}_{key}.so"
                if target.is_file():
                    try:
                        library = ctypes.CDLL(str(target))
                    except OSError:  # a damaged cached file (a full disk, a copy cut short): build it again
                        target.unlink(missing_ok=True)
                        library = self._build(compiler, flags, target)
                else:
                    library = self._build(compiler, flags, target)
            except (OSError, subprocess.CalledProcessError) as error:
                detail = getattr(error, "stderr", "") or str(error)
                self._fail(f"building {self.source.name} with {' '.join(compiler)} failed: {detail.strip()[:500]}")
                return None
            finally:
                if private is not None:  # a loaded library stays mapped without its file
                    shutil.rmtree(private, ignore_errors=True)
            self.configure(library)
            self._library = library
            return library

    def _build(self, compiler: list[str], flags: list[str], target: Path) -> ctypes.CDLL:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Built under a temporary name and renamed: concurrent first uses never see half a file.
        # Not mkstemp: the compiler keeps its 0600 file owner-only; a name it creates gets
        # the umask's mode, and others can load the kernel from a shared cache.
        tmp = str(target.with_name(f".{target.stem}.{secrets.token_hex(8)}.tmp.so"))
        try:
            subprocess.run(
                [*compiler, *flags, "-o", tmp, str(self.source), "-lm"], check=True, capture_output=True, text=True
            )
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return ctypes.CDLL(str(target))

    def _fail(self, reason: str) -> None:
        """Settle on no kernel, and say so once: the rules then step eagerly, several times slower."""
        self.error = reason
        warnings.warn(
            f"learned_optim: the fused CPU kernel {self.source.name} is unavailable ({reason}); rules step "
            "eagerly on CPU instead, about 3x slower. Pass impl='eager' to LearnedOptimizer to silence this.",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )


def _executor(threads: int) -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None or _pool._max_workers < threads:
            if _pool is not None:
                _pool.shutdown(wait=False)  # its idle threads exit; a bigger pool replaces it
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="learned_optim")
        return _pool


def split_ranges(n: int, align: int = 32, min_per_range: int = 4096) -> list[tuple[int, int]]:
    """``[0, n)`` in at most ``torch.get_num_threads()`` ranges of at least ``min_per_range``
    coordinates, each starting at a multiple of ``align``."""
    threads = max(1, min(torch.get_num_threads(), n // min_per_range))
    per = -(-n // threads)
    per = -(-per // align) * align
    return [(start, min(start + per, n)) for start in range(0, n, per)] if n else []


def run_parallel(fn: Callable[..., Any], calls: Sequence[Sequence[Any]]) -> None:
    """``fn(*args)`` for every ``args`` in ``calls``, on the thread pool (inline for one call)."""
    if len(calls) == 1:
        fn(*calls[0])
        return
    pool = _executor(len(calls))
    futures = [pool.submit(fn, *args) for args in calls]
    for future in futures:
        future.result()
