"""Shared fixtures: the real data directory ($CLTUNNEL_DATA, else ../shared/data beside the checkout)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", message="no QP solver found")

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    env = os.environ.get("CLTUNNEL_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


# Code under test that loads data itself (sweeps, Ray workers) finds it the way a user's shell would.
os.environ.setdefault("CLTUNNEL_DATA", str(data_dir()))


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    d = data_dir()
    if not (d / "cifar10-test.npz").exists():
        pytest.skip(f"real data not found in {d} (set CLTUNNEL_DATA)")
    return d


@pytest.fixture(scope="session")
def cifar10(real_data_dir):
    from cltunnel.data.images import load_dataset

    return load_dataset("cifar10", real_data_dir)


@pytest.fixture(scope="session")
def mnist(real_data_dir):
    from cltunnel.data.images import load_dataset

    return load_dataset("mnist", real_data_dir)


@pytest.fixture(autouse=True)
def threads_are_left_as_found():
    """Float sums depend on torch's thread count: a test that changes it and leaves it changed makes later
    tests compare runs made with different counts (seen: an in-process run against a subprocess run)."""
    import torch

    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    torch.set_num_threads(before)
    assert after == before, f"the test left torch's threads at {after} (found {before})"
