"""The shared experts' side stream (src/moe_engine/streams.py, used by moe.py) without a GPU: a fake
stream API records every fork, switch and join, and the MoE layer's ops record the stream that
was current when they ran.

What this cannot show: real concurrency on a GPU (that the two streams overlap, and how much
time it saves), that CUDA-graph capture records both branches (torch's fork/join idiom is what
its documentation prescribes for capture; the GPU suite runs captured steps), and the caching
allocator's behaviour across streams (streams.py argues why no record_stream is needed)."""
from __future__ import annotations

import contextlib

import pytest
import torch

import moe_engine
import moe_engine.moe as moe
from moe_engine.ops import available_backends
from moe_engine.streams import Branch, fork


class FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits {other.name}")


class FakeApi:
    """streams.Branch's api: one main and one side stream; `current` follows use()."""

    def __init__(self):
        self.log: list[str] = []
        self.main, self.side = FakeStream("main", self.log), FakeStream("side", self.log)
        self.current = self.main

    def current_stream(self, device):
        return self.current

    def side_stream(self, device):
        return self.side

    @contextlib.contextmanager
    def use(self, stream):
        prev, self.current = self.current, stream
        self.log.append(f"on {stream.name}")
        try:
            yield
        finally:
            self.current = prev
            self.log.append(f"on {prev.name}")


def test_fork_join_order():
    api = FakeApi()
    b = Branch(api, "cuda:0")
    assert api.log == ["side waits main"], "the fork must make the side stream wait first"
    with b:
        assert api.current is api.side
    assert api.current is api.main
    b.join()
    assert api.log == ["side waits main", "on side", "on main", "main waits side"]


def test_misuse_is_refused():
    api = FakeApi()
    b = Branch(api, "cuda:0")
    with b:
        with pytest.raises(RuntimeError, match="inside"):
            b.join()
    b.join()
    with pytest.raises(RuntimeError, match="after join"):
        with b:
            pass
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        fork("gpu", "cpu")


@pytest.mark.parametrize("backend", ["emu", "cpu", "torch", "cuda-disabled"])
def test_no_op_off_cuda(backend):
    """Off cuda (or with nothing to fork) the branch does nothing: no stream is touched, so
    torch.cuda is not even needed."""
    b = fork("cuda", torch.device("cpu"), enabled=False) if backend == "cuda-disabled" else fork(backend, "cpu")
    with b:
        pass
    b.join()


def test_moe_layer_runs_shared_on_the_side_stream(emu_model, monkeypatch):
    """The MoE layer with the fake API in place of CUDA: the shared experts launch on the side
    stream after the fork; router, route and routed experts on the caller's stream; the join comes
    after the routed experts and before combine; and the logits are those of the plain run."""
    ids = [[1, 5, 9, 3], [2, 7, 4, 4]]
    plain = emu_model.forward(ids)
    api = FakeApi()
    monkeypatch.setattr(moe, "fork", lambda backend, device, enabled=True: Branch(api if enabled else None, device))
    for name in ("shared_expert_cuda", "expert_ffn", "route", "combine"):
        fn = getattr(moe, name)

        def wrapped(*a, _fn=fn, _name=name, **k):
            api.log.append(f"{_name} on {api.current.name}")
            return _fn(*a, **k)
        monkeypatch.setattr(moe, name, wrapped)
    forked = emu_model.forward(ids)
    assert torch.equal(plain, forked)

    layers = [i for i, e in enumerate(api.log) if e == "side waits main"]
    assert len(layers) == len(emu_model.config.moe_layers) >= 1, api.log
    for start in layers:
        log = api.log[start:]
        log = log[:log.index("combine on main") + 1]
        assert log[:4] == ["side waits main", "on side", "shared_expert_cuda on side", "on main"], log
        assert log.index("main waits side") > log.index("expert_ffn on main") > log.index("route on main"), log
        assert log[-2:] == ["main waits side", "combine on main"], log


def _gpu():
    if not torch.cuda.is_available() or "cuda" not in available_backends():
        pytest.skip("needs a GPU and the cuda backend")


@pytest.mark.cuda
def test_fork_join_inside_graph_capture_on_the_gpu():
    """A fork/join captured in a CUDA graph (graphs.CudaGraph: warm-up, capture, replay) gives the
    eager result after its input changes, so the graph holds both branches and the join."""
    from moe_engine.graphs import CudaGraph
    _gpu()
    x = torch.randn(256, 256, device="cuda")
    out = {}

    def body():
        b = fork("cuda", x.device)
        with b:
            side = x @ x          # on the side stream
        main = x.sum(0) * 2       # on the capture stream meanwhile
        b.join()
        out["y"] = side + main

    g = CudaGraph(x.device)
    g.warmup(body)
    g.capture(body)
    x.copy_(torch.randn(256, 256, device="cuda"))
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out["y"], x @ x + x.sum(0) * 2)


@pytest.mark.cuda
def test_graphed_decode_equals_eager_on_the_gpu(tiny_ckpt):
    """The tiny model (2 shared experts a MoE layer) on cuda: decode steps replaying the captured
    graph (shared experts on the side stream inside it) give the eager steps' tokens, and logits
    within tests/tolerances.py (as tests/test_graphs.py checks on emu with a fake graph)."""
    from test_graphs import _close, _decode_both
    _gpu()
    kw = dict(dtype="bfloat16", device="cuda", backend="cuda", progress=False)
    graphed = moe_engine.load(tiny_ckpt, cuda_graph=True, **kw)
    eager = moe_engine.load(tiny_ckpt, cuda_graph=False, **kw)
    for lg, le in _decode_both(graphed, eager, [{}] * 4):
        _close(lg, le)
    assert graphed._graphs.captures == 1
