"""Output paths, checked before any work: a measurement that would finish and then fail to write
its results is refused before it starts, in one line naming the flag."""

from __future__ import annotations

import os
from pathlib import Path

from fusedqk.errors import UserError, shown

NAME_MAX = 255  # bytes in one path component on Linux and macOS file systems
PATH_MAX = 4096


def _named(flag: str, value: str) -> Path:
    """A non-empty path of a length the file system takes."""
    if not value.strip():
        raise UserError(f"{flag} {shown(value)} is empty; name a path, or leave the flag out")
    path = Path(value)
    if len(os.fsencode(value)) > PATH_MAX or any(
            len(os.fsencode(part)) > NAME_MAX for part in path.parts):
        raise UserError(f"{flag} {shown(value)}: the name is too long (at most {NAME_MAX} bytes "
                        f"per component, {PATH_MAX} in all)")
    return path


def _reachable(flag: str, path: Path, value: str) -> None:
    """The nearest existing folder above ``path`` must be a folder this process can write in."""
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{flag} {shown(value)}: {str(ancestor)!r} is a file, not a folder")
    if not path.exists() and not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {shown(value)}: {str(ancestor)!r} is not writable here")


def check_dir(flag: str, value: str | None) -> None:
    """An output folder, new or existing."""
    if value is None:
        return
    path = _named(flag, value)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {shown(value)} is an existing file; name a folder (new or "
                        "existing)")
    _reachable(flag, path, value)
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {shown(value)} is not writable here")


def check_file(flag: str, value: str | None) -> None:
    """An output file, new or to be replaced."""
    if value is None:
        return
    path = _named(flag, value)
    if path.is_dir():
        raise UserError(f"{flag} {shown(value)} is a folder; name a file")
    _reachable(flag, path, value)


def size(n: int) -> str:
    """Bytes in GiB, or MiB where GiB would show 0.0."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_room(folder: Path, need_bytes: int, need_files: int, headroom: int, flag: str,
               what: str) -> None:
    """Refuse to start writing ``what`` into ``folder`` where it cannot fit: its bytes plus the
    headroom fusedqk leaves free, and its files (a filesystem out of inodes refuses new files
    whatever its free bytes)."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    if need_bytes + headroom > free:
        raise UserError(f"{flag}: {what} needs {size(need_bytes)} of disk and {size(headroom)} "
                        f"left free beside it; {size(free)} are free there")
    if st.f_files and st.f_favail < need_files:  # f_files 0: no inode limit (btrfs, some FUSE)
        raise UserError(f"{flag}: {what} makes {need_files} files, but the filesystem there has "
                        f"{st.f_favail} free inodes ({size(free)} free bytes do not help)")

