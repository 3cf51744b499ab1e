"""moe_engine: a DeepSeekMoE inference engine whose MoE layer runs on our own kernels (CUDA, CPU,
and the CUDA kernels emulated on the CPU), with interpretability controls built in.

    import moe_engine
    model = moe_engine.load()                       # the bundled small model, or load(DIR)
    out = model.generate("The", max_new_tokens=16, temperature=0.8, seed=0, topk=1)
    out = model.generate(["a", "b"], SamplingParams(temperature=0.8, seed=0))   # as in vLLM
    logits = model.forward(ids, topk=2, expert_mask={1: [0, 3]}, capture=cap)
"""
import os as _os

# Busy machines: OpenMP worker threads (torch's and our kernels', one libgomp) that wait for the
# next parallel region spin first. libgomp's default spin is long (300,000 rounds), so beside
# other CPU-bound processes the spinners take the cores the working threads need and a decode
# step stalls. A short spin keeps the back-to-back regions of one step fast and sleeps soon after.
# libgomp reads this once, when it is loaded (with torch), so it must be set before torch is
# imported; the user's own OMP_WAIT_POLICY / GOMP_SPINCOUNT win, and MOE_ENGINE_SPIN=default
# keeps libgomp's default. Measurements: bench/contention.py, numbers in bench/README.md.
SPIN_COUNT = "10000"
if _os.environ.get("MOE_ENGINE_SPIN", "") != "default" and not (
        {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(_os.environ)):
    _os.environ["GOMP_SPINCOUNT"] = _os.environ.get("MOE_ENGINE_SPIN") or SPIN_COUNT

from .config import ConfigError, ModelConfig  # noqa: E402 (after the OpenMP setting)
from .interventions import Interventions, intervene
from .loader import CheckpointError
from .model import KVCache, Model, default_model_dir
from .taps import Capture, HookContext, Patch, TapRequest

__version__ = "0.1.0"

# From moe_engine.generate, imported on first use: importing it here would make
# `python -m moe_engine.generate` find its own module already loaded (runpy warns about that).
_FROM_GENERATE = ("Completion", "NonFiniteLogitsError", "SamplingParams", "TokenEvent")


def __getattr__(name):
    if name in _FROM_GENERATE:
        from . import generate
        return getattr(generate, name)
    raise AttributeError(f"module 'moe_engine' has no attribute {name!r}")


def load(path=None, **kwargs) -> Model:
    """Load a Hugging Face DeepSeekMoE checkpoint directory (default: the bundled small model).
    Keyword arguments: dtype ("bfloat16" | "float32"), device, backend, progress (default False:
    quiet in library use; the CLIs show a bar when stderr is a terminal), quant ("int8" | "int4":
    quantize on load), group_size, sym, context, check_memory, expert_parallel (under torchrun:
    this process holds 1/W of the routed experts; see Model.load)."""
    return Model.load(path, **kwargs)


__all__ = ["Capture", "CheckpointError", "Completion", "ConfigError", "HookContext", "Interventions",
           "KVCache", "Model", "ModelConfig", "NonFiniteLogitsError", "Patch", "SamplingParams",
           "TapRequest", "TokenEvent", "default_model_dir", "intervene", "load"]
