"""Files and folders the package writes: staged beside their target, swapped in whole, never
over a user's.

A file is written to a temporary name in its final directory and renamed into place
(``atomic_write_bytes``; ``os.replace`` is atomic on one file system); a folder is filled
beside its target and renamed into place (``staged_directory``). An interrupted write leaves
the old version or the new one, never half of one.

Two rules keep a user's files safe. A folder is replaced only when the package made it (a
student directory has its ``d2llm_config.json``; other folders carry a marker file) and holds
nothing the replacement would drop. And what is written gets the permissions a plain
``mkdir``/``open`` would give (the umask's), not ``tempfile``'s owner-only ones, so that a
student can be shared with the users of a deployment.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llama_index_d2llm.student.errors import UnsafeDirectoryError


def current_umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """What ``mkdir`` (directories) or ``open`` (files) would create under the umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def make_staging_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named folder in ``parent`` with the umask's permissions.

    ``tempfile.mkdtemp`` would make it 0700, and a folder renamed into place keeps that.
    """
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path


def apply_default_modes(root: Path) -> None:
    """Give ``root`` and everything in it the umask's permissions (safetensors writes 0600)."""
    directory_mode, file_mode = default_mode(directory=True), default_mode()
    root.chmod(directory_mode)
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod(directory_mode if path.is_dir() else file_mode)


def foreign_entries(directory: Path, known: Iterable[str]) -> list[str]:
    """Names in ``directory`` that are not among ``known`` (those its replacement would drop)."""
    if not directory.is_dir():
        return []
    known = set(known)
    return sorted(entry.name for entry in directory.iterdir() if entry.name not in known)


def refuse_foreign(directory: Path, known: Iterable[str], what: str, fix: str) -> None:
    """Raise when replacing ``directory`` would delete files other than ``known`` ones."""
    foreign = foreign_entries(directory, known)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5
                                          else "")
        raise UnsafeDirectoryError(
            f"{what} {str(directory)!r} holds files that are not part of a D2LLM student "
            f"({shown}); replacing it would delete them: {fix}"
        )


def replace_directory(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``; an existing target is swapped out only after success."""
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, backup)
        os.replace(source, target)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(source, target)


@contextmanager
def staged_directory(target: Path, prefix: str | None = None) -> Iterator[Path]:
    """A new folder beside ``target`` to fill: when the block succeeds it replaces ``target``
    whole (``replace_directory``), and it is deleted in any case, so a failure or a crash
    leaves ``target`` as it was."""
    work = make_staging_dir(target.parent, prefix or f".{target.name}.tmp-")
    try:
        yield work
        replace_directory(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(handle, default_mode())  # mkstemp's 0600 would stay on the renamed file
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps: Any) -> Path:
    """``obj`` as JSON (``json.dumps`` options in ``dumps``; default: UTF-8, indent 1)."""
    options = {"ensure_ascii": False, "indent": 1, **dumps}
    return atomic_write_text(path, json.dumps(obj, **options) + "\n")
