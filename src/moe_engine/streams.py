"""A second CUDA stream beside the caller's, for work that does not depend on what the caller's
stream does meanwhile: the MoE layer runs the shared experts on it while the routed experts run
on the caller's stream (moe.py), so the shared experts' small launches fill SMs the routed
launches leave idle.

    branch = fork(backend, device)   # the side stream waits for the work issued so far
    with branch:                     # launches in here go to the side stream
        shared = ...
    ...                              # the caller's stream goes on (router, routed experts)
    branch.join()                    # the caller's stream waits for the side stream's work

On cuda this is torch's fork/join idiom (`Stream.wait_stream` records an event on one stream and
makes the other wait on it), which CUDA-graph capture turns into the graph's dependency edges:
inside a captured decode step (graphs.py) the side stream joins the capture at the fork and
leaves it at the join, so the graph holds both branches and replays them concurrently. Every
launcher takes the current stream (ops/backend.py stream_of), so code inside `with branch` needs
no stream argument. On every other backend (emu, cpu, torch) fork returns a branch whose calls
do nothing: the same code runs, in program order.

Memory: tensors allocated inside the branch belong to the side stream in torch's caching
allocator. That is safe without record_stream because the side stream allocates only after its
fork, which orders its writes after everything the caller's stream had issued, including the
last reads of any block freed before. Tensors allocated before the fork (the input) are read by
the side stream and freed later on the caller's stream, after the join.

One side stream per thread and device (threads that share a device do not share one), created
the first time it is needed: on a decode step that is the eager warm-up before capture."""
from __future__ import annotations

import threading

import torch


class _TorchCuda:
    """The four calls a Branch makes, on torch.cuda."""

    _local = threading.local()

    def current_stream(self, device):
        return torch.cuda.current_stream(device)

    def side_stream(self, device):
        streams = self._local.__dict__.setdefault("streams", {})
        key = torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device()
        if key not in streams:
            streams[key] = torch.cuda.Stream(device=torch.device("cuda", key))
        return streams[key]

    def use(self, stream):
        return torch.cuda.stream(stream)


class Branch:
    """Work issued inside `with branch:` runs on a side stream that waited for the caller's stream
    at the fork; join() makes the caller's stream wait for it. api None: every call does nothing.
    api is any object with current_stream(device), side_stream(device) and use(stream) (a context
    manager that makes `stream` current), whose streams have wait_stream(other)."""

    def __init__(self, api, device):
        self._api, self._ctx, self._joined = api, None, False
        if api is None:
            return
        self.main = api.current_stream(device)
        self.side = api.side_stream(device)
        self.side.wait_stream(self.main)  # fork

    def __enter__(self):
        if self._api is not None:
            if self._joined:
                raise RuntimeError("Branch: work issued after join() would not be waited for")
            self._ctx = self._api.use(self.side)
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            return ctx.__exit__(*exc)
        return False

    def join(self) -> None:
        """The caller's stream waits for everything issued on the side stream so far."""
        if self._api is None:
            return
        if self._ctx is not None:
            raise RuntimeError("Branch: join() inside `with branch:` (the side stream would wait for itself)")
        self.main.wait_stream(self.side)
        self._joined = True


_CUDA = _TorchCuda()


def fork(backend: str, device, enabled: bool = True) -> Branch:
    """A Branch on a side stream of `device` when backend is "cuda" (and enabled: False when there
    is nothing to run beside, which saves the two event waits); a no-op Branch otherwise."""
    if backend not in ("cuda", "emu", "cpu", "torch"):
        raise ValueError(f"streams.fork: unknown backend {backend!r}; expected cuda, emu, cpu or torch")
    return Branch(_CUDA if backend == "cuda" and enabled else None, device)
