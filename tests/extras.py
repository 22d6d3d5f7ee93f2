"""Optional packages the tests need: absent, a test skips with the reason and the command that installs it; named in
$STAND_REQUIRE (comma-separated module names, as .ci/run sets it), a missing one is an error instead, so CI cannot
pass by skipping what it installed."""

from __future__ import annotations

import importlib.util
import os

import pytest

INSTALLERS = {"llama_cpp": "bash scripts/setup.sh", "arctic_inference": "bash scripts/setup.sh",
              "vllm": "bash scripts/setup-vllm.sh"}


def required(module: str) -> bool:
    return module in os.environ.get("STAND_REQUIRE", "").split(",")


def missing(module: str, reason: str | None = None) -> None:
    """Skips the calling test (or module, at import) because `module` is unavailable; fails where it is required."""
    why = reason or f"{module} is not installed"
    if required(module):
        raise RuntimeError(f"$STAND_REQUIRE names {module}, but {why}")
    pytest.skip(f"{why} ({INSTALLERS[module]} installs it)", allow_module_level=True)


def require(module: str) -> None:
    """Skips unless `module` can be imported (see missing)."""
    if importlib.util.find_spec(module) is None:
        missing(module)


METHOD_NEEDS = {"suffix": "arctic_inference"}  # methods whose drafter imports an optional package


def require_method(method: str) -> None:
    """Skips unless the drafter of `method` can run here (see missing)."""
    if method in METHOD_NEEDS:
        require(METHOD_NEEDS[method])
