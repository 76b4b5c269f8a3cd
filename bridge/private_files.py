"""Files and directories only their owner reads: the database, the config, keys, tokens.

A file that holds a secret or message content is created mode 0600 (never readable by others,
not even for the moment between its creation and a ``chmod``), an existing one is brought to
0600, and a directory the bridge creates for them is 0700.
"""

from __future__ import annotations

import os
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) mode 0700; an existing directory is left as it is
    (it may be the operator's, shared on purpose)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir(mode=DIR_MODE, exist_ok=True)
        os.chmod(directory, DIR_MODE)  # mkdir's mode goes through the umask
    return path


def private_file(path: Path) -> Path:
    """Create ``path`` empty mode 0600 if missing, else bring it to 0600; its content stays."""
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    return path


def write_private(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path``, mode 0600 from its creation."""
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)  # also when the file existed
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
