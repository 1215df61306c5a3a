"""Shared test set-up. Triton kernels run in Triton's CPU interpreter here unless a CUDA device is present; the
variable must be set before any kernel module is imported."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

requires_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (pip install triton)")


def triton_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def smollm2_dir():
    """Path of the bundled SmolLM2-135M-Instruct, converted to safetensors once; skips when its package is absent."""
    from tensorguard_fast.io.bundled import BundledModelMissing, bundled_model_dir

    try:
        return bundled_model_dir("smollm2")
    except BundledModelMissing as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """(model, tokenizer) of the bundled SmolLM2, float32, eval mode. Shared: tests must not modify it."""
    from tensorguard_fast.io.bundled import load_bundled

    return load_bundled("smollm2")
