"""Test setup: the real Triton kernels run on CUDA when present, else on CPU through Triton's
interpreter. TRITON_INTERPRET must be set before any kernel is decorated, so it happens here,
before fused_optim is imported by any test module."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
