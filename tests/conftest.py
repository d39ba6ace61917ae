"""Test setup: the real Triton kernels run on CUDA when present, else on CPU through Triton's
interpreter. TRITON_INTERPRET must be set before any kernel is decorated, so it happens here,
before fused_optim is imported by any test module."""

import os

import torch

# FUSED_OPTIM_TEST_FALLBACK=1 (set by tests/test_cpu_fallback.py for a subprocess) leaves the
# interpreter off, so CPU params take torch.optim's own implementation, the fallback under test.
if not torch.cuda.is_available() and os.environ.get("FUSED_OPTIM_TEST_FALLBACK") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
