"""run_program: run one case of an emulated kernel test program (built by conftest.emu_program)."""
import os
import subprocess

import pytest


def run_program(exe, *args, order="forward", timeout=300):
    """Run one case; fail with its output (which names the case and the first bad value)."""
    env = dict(os.environ, MOE_EMU_ORDER=order, MOE_EMU_SEED="7")
    r = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode:
        pytest.fail(f"{exe.name} {' '.join(map(str, args))} (order {order}) exited {r.returncode}:\n"
                    f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}", pytrace=False)
    return r.stdout
