import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    torch.set_num_threads(1)  # deterministic and fair on the 2-core CI machine
    os.environ.setdefault("FERKIT_CACHE", str(REPO / ".ci-cache"))
    # train.amp=auto means bf16 on CPUs with native bf16: the suite trains in fp32 on every machine (subprocesses too)
    os.environ["FERKIT_CPU_BF16"] = "0"


@pytest.fixture
def real_data_root() -> Path:
    root = Path(os.environ.get("FERKIT_DATA", REPO.parent / "shared" / "data"))
    if not (root / "fer2013").is_dir():
        pytest.skip(f"real FER data not found at {root}; set FERKIT_DATA to a folder with fer2013/, ckplus48/, jaffe/")
    return root


def shared_dataset(name: str) -> Path:
    """``$FERKIT_DATA/<name>`` (default ``../shared/data/<name>``), or skip the test saying where it looked."""
    root = Path(os.environ.get("FERKIT_DATA", REPO.parent / "shared" / "data")) / name
    if not root.is_dir():
        pytest.skip(f"real dataset {name!r} not found at {root}; set FERKIT_DATA to the folder holding {name}/")
    return root
