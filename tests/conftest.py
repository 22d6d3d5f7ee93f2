import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("STAND_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny():
    from stand.testing import tiny_target

    return tiny_target()


@pytest.fixture(scope="session")
def real_f32():
    """The real default model in float32 (slow: about 30 s to load)."""
    from stand.backends.load import load_model

    return load_model(None, "float32", backend="torch")
