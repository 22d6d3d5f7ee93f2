"""Files stand writes: atomically (a temporary file beside the target, then a rename), so a reader or a
crash never sees half a file; JSON read with a clear error; the cache directory."""

from __future__ import annotations

import contextlib
import json
import os

from stand.errors import StandError


def cache_dir() -> str:
    """Where stand keeps what it measured or built once per machine and model: $STAND_CACHE or ~/.cache/stand."""
    return os.environ.get("STAND_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "stand")


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yields a temporary path to write; on success it replaces `path` in one rename, on failure it is removed.
    suffix: an extension the writer insists on (numpy's savez appends .npz)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
