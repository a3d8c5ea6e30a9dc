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
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

__all__ = ["KernelLibrary", "run_parallel", "split_ranges"]

_HERE = Path(__file__).resolve().parent
_HEADERS = ("vecmath.h",)
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _cache_dir() -> Path:
    root = os.environ.get("LEARNED_OPTIM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "learned_optim"
    )
    return Path(root) / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
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
                self.error = "no C compiler found (set $CC)"
                return None
            flags = _flags()
            # The build flags hold this file's folder, which differs between installs: not part of the key.
            key_flags = [f for f in flags if not f.startswith("-I")]
            text = self.source.read_bytes() + b"".join((_HERE / h).read_bytes() for h in _HEADERS)
            key = hashlib.sha256(text + " ".join([compiler, *key_flags]).encode()).hexdigest()[:16]
            target = _cache_dir() / f"{self.source.stem}_{key}.so"
            try:
                if not target.is_file():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    # Built under a temporary name and renamed: concurrent first uses never see half a file.
                    # Not mkstemp: the compiler keeps its 0600 file owner-only; a name it creates gets
                    # the umask's mode, and others can load the kernel from a shared cache.
                    tmp = str(target.with_name(f".{target.stem}.{secrets.token_hex(8)}.tmp.so"))
                    try:
                        subprocess.run(
                            [compiler, *flags, "-o", tmp, str(self.source), "-lm"],
                            check=True,
                            capture_output=True,
                            text=True,
                        )
                        os.replace(tmp, target)
                    finally:
                        if os.path.exists(tmp):
                            os.unlink(tmp)
                library = ctypes.CDLL(str(target))
            except (OSError, subprocess.CalledProcessError) as error:
                detail = getattr(error, "stderr", "") or str(error)
                self.error = f"building {self.source.name} with {compiler} failed: {detail.strip()[:500]}"
                return None
            self.configure(library)
            self._library = library
            return library


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
