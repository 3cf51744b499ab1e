"""Shared fixtures: small random checkpoints built once per session."""
import pytest
import torch

from moe_engine.synthetic import make_checkpoint


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny preset (3 layers: dense + 2 MoE, 8 experts top-2, 2 shared), bf16 on disk."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_fp32_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny32"), "tiny", seed=1, dtype="float32")


@pytest.fixture(scope="session")
def tiny_fp32(tiny_fp32_dir):
    import moe_engine
    return moe_engine.load(tiny_fp32_dir, dtype="float32", backend="torch", progress=False)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
