"""moe_engine: a DeepSeekMoE inference engine whose MoE layer runs on our own kernels (CUDA, CPU,
and the CUDA kernels emulated on the CPU), with interpretability controls built in.

    import moe_engine
    model = moe_engine.load()                       # the bundled small model, or load(DIR)
    out = model.generate("The", max_new_tokens=16, topk=1)
    logits = model.forward(ids, topk=2, expert_mask={1: [0, 3]}, capture=cap)
"""
from .config import ConfigError, ModelConfig
from .interventions import Interventions, intervene
from .loader import CheckpointError
from .model import KVCache, Model, default_model_dir
from .taps import Capture, HookContext, Patch, TapRequest

__version__ = "0.1.0"


def load(path=None, **kwargs) -> Model:
    """Load a Hugging Face DeepSeekMoE checkpoint directory (default: the bundled small model).
    Keyword arguments: dtype ("bfloat16" | "float32"), device, backend, progress."""
    return Model.load(path, **kwargs)


__all__ = ["Capture", "CheckpointError", "ConfigError", "Interventions", "KVCache", "Model",
           "ModelConfig", "Patch", "HookContext", "TapRequest", "default_model_dir", "intervene",
           "load"]
