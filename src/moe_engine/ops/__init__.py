"""The MoE-layer ops. Each module holds the math in its docstring, the PyTorch reference
`<op>_ref`, and a checked dispatcher `<op>(..., backend=)` that validates tensors and calls the
cuda / cpu / emu kernels or the reference."""
from .align import Aligned, align, align_ref
from .backend import BACKENDS, BackendUnavailable, available_backends
from .combine import combine, combine_ref
from .expert_ffn import expert_ffn, expert_ffn_ref, swiglu
from .route import route, route_ref

__all__ = ["Aligned", "align", "align_ref", "BACKENDS", "BackendUnavailable", "available_backends",
           "combine", "combine_ref", "expert_ffn", "expert_ffn_ref", "swiglu", "route", "route_ref"]
