"""Shared fixtures: small random checkpoints built once per test session (moe_engine.synthetic)."""

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # import the source tree

from moe_engine.synthetic import make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """`tiny` preset, one model.safetensors, bf16. Read-only: copy it before mutating."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny")


@pytest.fixture(scope="session")
def tiny_ckpt_sharded(tmp_path_factory) -> Path:
    """`tiny` preset in 3 shards + index (same seed, so the same weights as tiny_ckpt)."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny-sharded"), "tiny", shards=3)


@pytest.fixture
def copy_ckpt(tmp_path):
    """copy_ckpt(src) -> a private, mutable copy of a checkpoint directory."""
    def copy(src: Path) -> Path:
        return Path(shutil.copytree(src, tmp_path / src.name))
    return copy
