"""Files that are never half-written: atomic writes, checked reads, leftovers of killed runs.

Every file the package writes (cache entries, checkpoints, result files, weights, notebooks) goes
through :func:`atomic_write`: the content is written to a temporary file ``.<name>.<random>.tmp``
in the same directory and renamed over the target, so a reader sees the old file or the new one,
never a partial one. The temporary file gets the mode a plain ``open()`` would give (0666 minus
the umask), not ``mkstemp``'s 0600. A process killed between the two steps leaves only such a
temporary file; :func:`remove_leftovers` deletes them on the next run.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "read_json", "remove_leftovers", "write_json"]

_TMP_SUFFIX = ".tmp"


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException as err:
        full = isinstance(err, Exception) and _disk_full(err, path.parent)
        Path(tmp).unlink(missing_ok=True)
        if full:  # writers such as torch.save report it as "basic_ios::clear: iostream error"
            raise OSError(
                errno.ENOSPC,
                f"no space left on the device of {path.parent} while writing {path.name}; free "
                f"some space and rerun (the previous {path.name}, if any, is unchanged)",
            ) from err
        raise
    return path


#: A write that fails with less than this much free space left failed for want of space.
DISK_FULL_BYTES = 1 << 20


def _disk_full(err: Exception, directory: Path) -> bool:
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    try:
        return shutil.disk_usage(directory).free < DISK_FULL_BYTES
    except OSError:
        return False


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """``data`` as indented UTF-8 JSON (with a final newline), written atomically."""
    text = json.dumps(data, indent=1, ensure_ascii=False) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_json(path: str | os.PathLike, what: str = "file", recover: str = "delete it") -> Any:
    """Parse a JSON file; a truncated or corrupt one raises ``ValueError`` naming the file,
    ``what`` it should be and how to ``recover``."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a valid {what} ({err}); {recover}") from None


def remove_leftovers(directory: str | os.PathLike, older_than: float = 60.0) -> list[Path]:
    """Delete the temporary files of :func:`atomic_write` that a killed process left in
    ``directory`` (those older than ``older_than`` seconds, so a concurrent writer's file is kept);
    return them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    now, removed = time.time(), []
    for tmp in directory.glob(f".*{_TMP_SUFFIX}"):
        try:
            if now - tmp.stat().st_mtime > older_than:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed
