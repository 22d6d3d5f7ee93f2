"""Files stand writes: atomically (a temporary file beside the target, then a rename), so a reader or a
crash never sees half a file; JSON read with a clear error; the cache directory."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import stat
import tempfile

from stand.errors import StandError


def cache_dir() -> str:
    """Where stand keeps what it measured or built once per machine and model: $STAND_CACHE or ~/.cache/stand."""
    return os.environ.get("STAND_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "stand")


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "", private: bool = False):
    """Yields a temporary path to write; on success it replaces `path` in one rename, on failure it is removed.

    The temporary file lies beside the file `path` names (a symlink's target: the link stays a link), under a
    name no other user can guess or take first (mkstemp, created 0600), `.NAME.PID.XXXX.tmp`; temporary files
    of this path left by a process that died (SIGKILL, a crash) are removed first. The file keeps the mode of
    the one it replaces; a new one gets 0666 less the umask, or 0600 when private (data of several users).
    suffix: an extension the writer insists on (numpy's savez appends .npz)."""
    target = os.path.realpath(path)
    directory, name = os.path.split(target)
    os.makedirs(directory, exist_ok=True)
    remove_stale(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}.", suffix=".tmp" + suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o600 if private else _mode_of(target))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _mode_of(path: str) -> int:
    """The permission bits of the file at path, or those a new file gets (0666 less the umask)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return 0o022


def remove_stale(target: str) -> None:
    """Removes the temporary files of `target` (atomic_path's) whose process is gone."""
    directory, name = os.path.split(target)
    for tmp in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.*.*.tmp*")):
        pid = os.path.basename(tmp)[len(name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                os.remove(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def read_json(path: str, what: str):
    """The parsed document; a StandError naming `what` and the path if it cannot be read or parsed."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise StandError(f"cannot read {what} {path}: {e}") from e


def write_json(path: str, doc, indent: int | None = 1) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(doc, f, indent=indent)
