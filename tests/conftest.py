import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("STAND_TEST_THREADS", "1")))


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory):
    """The whole session caches what it measures or builds (cost grids, dtype choices, tables) in a temporary
    directory, never in the user's ~/.cache/stand (a test may still point STAND_CACHE elsewhere for itself)."""
    before = os.environ.get("STAND_CACHE")
    os.environ["STAND_CACHE"] = str(tmp_path_factory.mktemp("stand-cache"))
    yield
    if before is None:
        os.environ.pop("STAND_CACHE", None)
    else:
        os.environ["STAND_CACHE"] = before


@pytest.fixture(scope="session")
def tiny():
    from tiny import tiny_target

    return tiny_target()


@pytest.fixture(scope="session")
def real_f32():
    """The real default model in float32 (slow: about 30 s to load)."""
    from stand.backends.load import load_model

    return load_model(None, "float32", backend="torch")
