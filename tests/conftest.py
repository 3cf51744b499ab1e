"""Shared fixtures: small random checkpoints built once per test session (moe_engine.synthetic).

Set MOE_ENGINE_REQUIRE_BACKENDS=cpu,emu (CI does) to fail instead of skipping when a compiled
backend is missing, so a broken build can never pass as "skipped". MOE_ENGINE_CPU_MODULE=<_C .so>
(tools/test_cpu_isas.sh) swaps in another build of moe_engine._C; that check and every test see it.
"""
import os
import shutil
from pathlib import Path

import pytest
import torch

from moe_engine.ops import available_backends
from moe_engine.synthetic import make_checkpoint


def pytest_sessionstart(session):
    required = [b for b in os.environ.get("MOE_ENGINE_REQUIRE_BACKENDS", "").split(",") if b]
    missing = [b for b in required if b not in available_backends()]
    if missing:
        raise pytest.UsageError(f"MOE_ENGINE_REQUIRE_BACKENDS names {missing}, which are not available "
                                f"here (available: {available_backends()})")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """`tiny` preset (3 layers: dense + 2 MoE, 8 experts top-2, 2 shared), one
    model.safetensors, bf16. Read-only: copy it before mutating."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny")


tiny_dir = tiny_ckpt


@pytest.fixture(scope="session")
def tiny_ckpt_sharded(tmp_path_factory) -> Path:
    """`tiny` preset in 3 shards + index (same seed, so the same weights as tiny_ckpt)."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny-sharded"), "tiny", shards=3)


@pytest.fixture(scope="session")
def tiny_fp32_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny32"), "tiny", seed=1, dtype="float32")


@pytest.fixture(scope="session")
def tiny_fp32(tiny_fp32_dir):
    import moe_engine
    return moe_engine.load(tiny_fp32_dir, dtype="float32", backend="torch", progress=False)


@pytest.fixture(scope="module")
def emu_model(tiny_ckpt):
    """tiny_ckpt in bf16 on the emu backend (the CUDA kernels on the CPU), one per test module."""
    import moe_engine
    if "emu" not in available_backends():
        pytest.skip("emu backend not built")
    return moe_engine.load(tiny_ckpt, dtype="bfloat16", backend="emu", progress=False)


@pytest.fixture
def copy_ckpt(tmp_path):
    """copy_ckpt(src) -> a private, mutable copy of a checkpoint directory."""
    def copy(src: Path) -> Path:
        return Path(shutil.copytree(src, tmp_path / src.name))
    return copy


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


# The files whose tests take tens of seconds each (doc commands that run the CLIs and benches,
# nvcc builds): run first, so that under pytest-xdist (the README's `pytest -n auto`) the last
# minutes are short tests spread over every worker rather than one long test on one core. A stable
# sort: order within a file (and module-scoped fixtures) unchanged.
_LONG_FIRST = ("tests/test_docs.py", "tests/emu/test_nvcc_build.py", "tests/test_bench.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(_LONG_FIRST))
