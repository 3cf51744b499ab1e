"""Backend selection and the tensor checks every dispatcher runs before calling a kernel.

Backends (docs/design.md §2):
  torch  the PyTorch reference; every other backend is checked against it
  cpu    C++ kernels in csrc/cpu (module moe_engine._C)
  cuda   the CUDA kernels in csrc/cuda (module moe_engine._C, built when nvcc was found)
  emu    the same CUDA kernels run on the CPU by csrc/emu (module moe_engine._C_emu);
         correctness only, slow
  auto   cuda when the tensors live on a GPU, else cpu

An unsupported case raises; nothing falls back silently to another backend.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from functools import cache

import torch

BACKENDS = ("auto", "torch", "cpu", "cuda", "emu")


class BackendUnavailable(RuntimeError):
    """The requested backend was not built or has no device here."""


@cache
def native_module(backend: str):
    """The compiled module that implements `backend`'s kernels."""
    if backend not in ("cpu", "cuda", "emu"):
        raise ValueError(f"backend {backend!r} has no compiled module; expected cpu, cuda or emu")
    name = "moe_engine._C_emu" if backend == "emu" else "moe_engine._C"
    override = os.environ.get("MOE_ENGINE_CPU_MODULE") if name == "moe_engine._C" else None
    try:
        mod = _load_from_file(name, override) if override else importlib.import_module(name)
    except ImportError as e:
        raise BackendUnavailable(
            f"backend {backend!r} needs the compiled module {name}, which failed to import ({e}); "
            "reinstall the package (pip install .) or build in place with tools/dev_build.sh"
        ) from e
    if backend == "cuda":
        if not mod.has_cuda_kernels:
            raise BackendUnavailable(
                "backend 'cuda': moe_engine._C was built without CUDA kernels (nvcc was not found "
                "at build time); rebuild on a machine with nvcc"
            )
        if mod.cuda_device_count() == 0 or not torch.cuda.is_available():
            raise BackendUnavailable("backend 'cuda': no GPU is present on this machine")
    return mod


def _load_from_file(name: str, path: str):
    """Test hook for the CPU ISA variants (tools/test_cpu_isas.sh): MOE_ENGINE_CPU_MODULE=<path of a
    built _C .so> makes the process use that file as moe_engine._C (cpu and cuda backends alike)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MOE_ENGINE_CPU_MODULE={path}: no such file (expected a built _C module)")
    if name in sys.modules:  # one _C per process: two would register the same pybind11 types
        if not os.path.samefile(sys.modules[name].__file__, path):
            raise ImportError(f"MOE_ENGINE_CPU_MODULE={path}, but {name} is already imported from "
                              f"{sys.modules[name].__file__}")
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


def resolve(backend: str, device: torch.device | str) -> str:
    """Turn 'auto' into a concrete backend and check that it fits the tensors' device."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    device = torch.device(device)
    if backend == "auto":
        return "cuda" if device.type == "cuda" else "cpu"
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs tensors on a CUDA device, got {device}")
    if backend in ("cpu", "emu") and device.type != "cpu":
        raise ValueError(f"backend {backend!r} needs CPU tensors, got {device}")
    return backend


def available_backends() -> list[str]:
    """Backends that can run on this machine (torch always)."""
    out = ["torch"]
    for b in ("cpu", "emu", "cuda"):
        try:
            native_module(b)
            out.append(b)
        except BackendUnavailable:
            pass
    return out


def check(t: torch.Tensor | None, name: str, *, dtype=None, shape=None, device=None,
          contiguous: bool = True, optional: bool = False) -> None:
    """Validate one tensor argument; the message names the argument, the value and what was expected.

    `shape` entries may be None (any size)."""
    if t is None:
        if optional:
            return
        raise ValueError(f"{name} is required")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        if t.dtype not in allowed:
            raise ValueError(f"{name} has dtype {t.dtype}, expected {' or '.join(map(str, allowed))}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} has shape {list(t.shape)}, expected {want}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (strides {t.stride()})")


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def stream_of(backend: str, device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if backend == "cuda" else 0


def device_of(backend: str, device: torch.device) -> int:
    """The device index a CUDA launcher makes current for its launches (ops.h; -1 = keep the
    current one, for the emulator). _C links the CUDA runtime statically, so torch's current
    device is not the kernels': without this, tensors on cuda:1 would launch on device 0."""
    if backend != "cuda":
        return -1
    return torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device()


def check_same_device(device: torch.device, **tensors) -> None:
    """Refuse tensors on another device than `device` (None entries are skipped): a kernel
    launched on one device cannot read another's memory."""
    for name, t in tensors.items():
        if t is not None and t.device != torch.device(device):
            raise ValueError(f"{name} is on {t.device}, expected {device} like the other inputs "
                             "(mixed devices are not supported)")


def native_dtype(mod, dtype: torch.dtype):
    if dtype == torch.float32:
        return mod.DType.f32
    if dtype == torch.bfloat16:
        return mod.DType.bf16
    raise ValueError(f"dtype {dtype} is not supported by the kernels; expected float32 or bfloat16")
