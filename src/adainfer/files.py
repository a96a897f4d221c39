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
