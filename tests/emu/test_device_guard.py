"""Every CUDA launcher runs on its tensors' device (ops.h: the `device` argument and
csrc/cuda/common.cuh DeviceGuard), and mixed devices are refused before any launch.

On the emulator (fake devices, MOE_EMU_DEVICES=2; tests/emu/cpp/device_guard_test.cu): each
launcher with device 0 current and device 1 requested launches every kernel on device 1 and
restores device 0, also when it throws; a device that does not exist is refused with its number.
Cannot show: that the driver really switches contexts (emulated memory is shared by every fake
device, so a pointer of another device would not fault here) or what a launch on the wrong GPU
does; the `cuda` tests below check that on a GPU.
"""
from __future__ import annotations

import pytest
import torch

from emu_harness import CPP, REPO, run_program, util_tag

KERNELS = ["route", "align", "combine", "expert_gemm", "moe_decode", "shared_expert"]


@pytest.fixture(scope="session")
def guard_prog(emu_builder):
    sources = [CPP / "device_guard_test.cu", *(REPO / "csrc" / "cuda" / f"{k}.cu" for k in KERNELS)]
    return emu_builder.build(f"device_guard_test-{util_tag()}", sources)


@pytest.mark.parametrize("case", ["every_launcher", "invalid_device", "throw_restores", "attribute_once"])
def test_launchers_run_on_the_tensors_device(guard_prog, case):
    """See the module docstring; one case per run of the program. attribute_once: expert_gemm's
    cudaFuncSetAttribute runs once per kernel and device, not on every launch (the emulator
    counts the calls). Cannot show: the cost of the call on a GPU."""
    r = run_program(guard_prog, case, env_extra={"MOE_EMU_DEVICES": "2"}, timeout=120)
    assert r.returncode == 0 and f"OK {case}" in r.stdout, r.stdout[-4000:] + r.stderr[-4000:]


def test_one_fake_device_by_default(guard_prog):
    """Without MOE_EMU_DEVICES the emulator has one device, so the program refuses to run rather
    than pass vacuously."""
    r = run_program(guard_prog, "every_launcher", timeout=60)
    assert r.returncode == 1 and "needs MOE_EMU_DEVICES=2" in r.stdout, r.stdout + r.stderr


# ---- mixed devices, refused by the Python dispatchers before any launch -----------------------

def _emu():
    from moe_engine.ops import available_backends
    if "emu" not in available_backends():
        pytest.skip("the emu backend (_C_emu) is not built")


def test_mixed_devices_refused_shared_expert():
    """A weight on another device than x is refused with both devices named ('meta' stands in for
    a second device: no memory, so nothing could run by accident)."""
    _emu()
    from moe_engine.ops.expert_ffn import shared_expert_cuda
    x = torch.zeros(2, 16, dtype=torch.bfloat16)
    gate_up = torch.zeros(32, 16, dtype=torch.bfloat16, device="meta")
    down = torch.zeros(16, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"shared gate_up is on meta, expected cpu"):
        shared_expert_cuda(x, gate_up, down, backend="emu")


def test_mixed_devices_refused_route_controls():
    """Routing controls (k, mask, force) the model keeps on the device must be on the logits'."""
    _emu()
    from moe_engine.ops import route
    logits = torch.randn(2, 8)
    controls = (torch.tensor([2], dtype=torch.int32, device="meta"), None,
                torch.tensor([-1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"k is on meta, expected cpu .*mixed devices"):
        route(logits, 2, controls=controls, backend="emu")


@pytest.mark.parametrize("which", ["topk_ids", "experts_down"])
def test_mixed_devices_refused_expert_ffn(which):
    _emu()
    from moe_engine.ops import expert_ffn
    T, E, k, D, F = 2, 4, 2, 16, 16
    args = dict(x=torch.zeros(T, D, dtype=torch.bfloat16), topk_ids=torch.zeros(T, k, dtype=torch.int32),
                experts_gate_up=torch.zeros(E, 2 * F, D, dtype=torch.bfloat16),
                experts_down=torch.zeros(E, D, F, dtype=torch.bfloat16))
    args[which] = args[which].to("meta")
    with pytest.raises(ValueError, match=f"{which} is on meta"):
        expert_ffn(args["x"], args["topk_ids"], args["experts_gate_up"], args["experts_down"], backend="emu")


# ---- on a GPU (pytest -m cuda) ------------------------------------------------------------------

def _cuda_or_skip(n: int = 1):
    from moe_engine.ops import available_backends
    if "cuda" not in available_backends() or torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} GPU(s) and the cuda backend")


@pytest.mark.cuda
def test_cuda_launch_on_second_gpu_matches_first():
    """Tensors on cuda:1 with cuda:0 current give the result of the same call on cuda:0, and
    cuda:0 stays current (the launcher's guard restores it)."""
    _cuda_or_skip(2)
    from moe_engine.ops import expert_ffn
    torch.manual_seed(0)
    T, E, k, D, F = 5, 8, 2, 64, 64
    x = torch.randn(T, D).bfloat16()
    ids = torch.randint(0, E, (T, k), dtype=torch.int32)
    gu = (torch.randn(E, 2 * F, D) / 8).bfloat16()
    dn = (torch.randn(E, D, F) / 8).bfloat16()
    torch.cuda.set_device(0)
    outs = [expert_ffn(*(t.to(f"cuda:{d}") for t in (x, ids, gu, dn)), backend="cuda").cpu() for d in (0, 1)]
    assert torch.cuda.current_device() == 0
    assert torch.equal(outs[0], outs[1])


@pytest.mark.cuda
def test_cuda_mixed_devices_refused():
    """x on the GPU and a weight on the CPU is refused before any launch."""
    _cuda_or_skip(1)
    from moe_engine.ops import expert_ffn
    x = torch.zeros(2, 64, dtype=torch.bfloat16, device="cuda")
    ids = torch.zeros(2, 2, dtype=torch.int32, device="cuda")
    gu = torch.zeros(4, 128, 64, dtype=torch.bfloat16, device="cuda")
    dn = torch.zeros(4, 64, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="experts_down is on cpu"):
        expert_ffn(x, ids, gu, dn, backend="cuda")
