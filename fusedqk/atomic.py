"""Atomic file writes: a reader (or a killed run) never sees a half-written result file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def caller_mode(directory: bool = False) -> int:
    """The mode a new file (0666) or folder (0777) of the caller's gets under its umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def write_with(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes the file private (0600); a result file gets the mode any file of the
    # caller's gets (0666 less the umask), so others and web servers can read an archive.
    os.fchmod(fd, caller_mode())
    os.close(fd)
    try:
        writer(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(path: str | Path, data: bytes) -> Path:
    return write_with(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_files(files: dict[Path, str | bytes]) -> list[Path]:
    """Several files that belong together (a benchmark's trials, tokens and summary; a report
    and its plots): every one
    is written to a temporary file first, and only when all are written are they renamed into
    place, so a full disk leaves none of them rather than some. A failure is one line."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, text in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            staged.append((tmp, path))
            os.fchmod(fd, caller_mode())
            with os.fdopen(fd, "wb") as out:
                out.write(text.encode("utf-8") if isinstance(text, str) else text)
        for tmp, path in staged:
            os.replace(tmp, path)
        return [path for _, path in staged]
    except OSError as e:
        from fusedqk.errors import UserError

        where = e.filename or (staged[-1][1] if staged else next(iter(files), ""))
        raise UserError(f"{where}: cannot write the results there ({e.strerror or e}); nothing "
                        "of this set was written") from None
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
