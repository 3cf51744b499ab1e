"""Session fixture for tests/emu: the cached builder of the emulated C++ test programs."""
import pytest

from emu_harness import Builder, make_builder


@pytest.fixture(scope="session")
def emu_builder() -> Builder:
    return make_builder()
