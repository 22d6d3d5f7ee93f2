"""JSON files: read with a clear error, written atomically (write, then rename)."""

from __future__ import annotations

import json
import os

from stand.errors import StandError


def read(path: str, what: str):
    """The parsed document; a StandError naming `what` and the path if it cannot be read or parsed."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise StandError(f"cannot read {what} {path}: {e}") from e


def write(path: str, doc) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)
