"""Writing files so that an interrupted write never leaves a truncated or half-replaced file."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_files(directory: Path, files: dict[str, bytes]) -> None:
    """Write every file of ``files`` (name -> contents) in ``directory`` to a temporary name
    first, then rename each into place: a file is the old one or the new one, never a mix."""
    temporaries: dict[str, str] = {}
    try:
        for name, data in files.items():
            # Not mkstemp: its files are 0600 and would stay owner-only after the rename;
            # os.open with 0666 lets the umask decide, like any other file the user writes.
            # A random name: two processes writing the same file never share a temporary.
            tmp = str(directory / f".{name}.{secrets.token_hex(8)}.tmp")
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            temporaries[name] = tmp
            Path(tmp).write_bytes(data)
        for name, tmp in temporaries.items():
            os.replace(tmp, directory / name)
    finally:
        for tmp in temporaries.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
