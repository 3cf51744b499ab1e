"""Session fixture for tests/emu: the cached builder of the emulated C++ test programs.

The helpers live in emu_harness.py (import them from there: tests/conftest.py is also a module
named `conftest`); they are re-exported here for the test files that still import conftest.
"""
import pytest

from emu_harness import CPP, ORDERS, REPO, Builder, make_builder, run_program, sanitize_mode  # noqa: F401


@pytest.fixture(scope="session")
def emu_builder() -> Builder:
    return make_builder()
