"""Writing result files whole or not at all. A ground floor: imports nothing from adainfer.

A run killed mid-write (long collections and benchmarks are killed and resumed) must leave
either the previous file or the new one, never half of one that a resumed run then trusts.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path), then move the finished file into place (never a half file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file owner-only; a results file is for everyone the umask allows
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path, data) -> Path:
    write_text_atomic(path, json.dumps(data, indent=2))
    return Path(path)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: set it straight back
    os.umask(mask)
    return mask


class FolderInUse(RuntimeError):
    """Another live process writes to this output; the message names it and its pid."""


class OutputLock:
    """An exclusive lock on an output (a folder, or one file) for a writer's lifetime.

    Two runs writing to one folder each number their own parts and overwrite the other's, both
    reporting success; a second writer is refused instead. The lock is `fcntl.flock` on a lock
    file (`<folder>/.lock`, or `.<name>.lock` beside a file): the kernel drops it when the
    holder dies, so a killed run never leaves a stale lock, only a file that the next writer
    takes over. Use as a context manager; each `rank` of a torchrun run holds its own lock, as
    it writes its own parts."""

    def __init__(self, path: str | os.PathLike, *, folder: bool = True, rank: int = 0):
        self.target = Path(path)
        name = ".lock" if rank == 0 else f".lock-r{rank}"
        self.path = (
            self.target / name if folder else self.target.parent / f".{self.target.name}{name}"
        )
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise FolderInUse(
                    f"{self.target} is in use by another adainfer run (pid {holder}, lock "
                    f"{self.path}); wait for it to finish or write to another folder"
                ) from None
            # the holder before us may have removed the file after we opened it: then we
            # locked a file nobody else will see, so try again on the one at the path
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        # unlink while still holding it: a waiter that opened the old file re-checks the path
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing releases the flock
        self._fd = None


def read_json(path: str | os.PathLike, what: str = "JSON file"):
    """The JSON in `path`; a damaged or unreadable file is a ValueError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable {what} ({e}); delete or restore it") from None
