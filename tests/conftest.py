import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    torch.set_num_threads(1)  # deterministic and fair on the 2-core CI machine
    os.environ.setdefault("FERKIT_CACHE", str(REPO / ".ci-cache"))


@pytest.fixture
def real_data_root() -> Path:
    root = Path(os.environ.get("FERKIT_DATA", REPO.parent / "shared" / "data"))
    if not (root / "fer2013").is_dir():
        pytest.skip(f"real FER data not found at {root}; set FERKIT_DATA to a folder with fer2013/, ckplus48/, jaffe/")
    return root
