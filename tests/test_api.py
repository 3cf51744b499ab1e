"""The Python API as users of vLLM / transformers expect it: sampling keywords beside
interventions, SamplingParams and Completion from moe_engine, chat messages, ragged forward,
logprobs, n, per-request seeds independent of the batch, NaN logits caught, and a typed error
naming the value for every bad argument of generate / iter_generate / Model.generate."""
import math

import pytest
import torch

import moe_engine
from moe_engine import Completion, NonFiniteLogitsError, SamplingParams
from moe_engine.generate import generate, iter_generate

HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return moe_engine.load(tiny_dir, backend="torch")


def test_exports():
    assert moe_engine.SamplingParams is SamplingParams and moe_engine.Completion is Completion
    assert {"SamplingParams", "Completion", "TokenEvent", "NonFiniteLogitsError"} <= set(moe_engine.__all__)


def test_sampling_keywords_beside_interventions(tiny):
    kw = dict(temperature=0.9, top_p=0.95, top_k=40, seed=3, max_new_tokens=6)
    a = tiny.generate("hello", topk=0, **kw)[0]
    b = tiny.generate("hello", SamplingParams(0.9, 0.95, 40, 3, max_new_tokens=6), topk=0)[0]
    c = generate(tiny, "hello", sampling=SamplingParams(seed=3), temperature=0.9, top_p=0.95, top_k=40,
                 max_new_tokens=6, topk=0)[0]
    assert a.token_ids == b.token_ids == c.token_ids and len(a.token_ids) == 6
    assert a.token_ids != tiny.generate("hello", **kw)[0].token_ids  # topk=0 was applied


def test_unknown_keyword_is_named(tiny):
    with pytest.raises(TypeError, match=r"unknown keyword.*'temprature'.*temperature.*topk"):
        tiny.generate("hello", temprature=0.5)


def test_chat_messages_wherever_a_chat_prompt_is(tiny):
    tok = tiny.tokenizer
    ids = tok.apply_chat_template(HI, add_generation_prompt=True)
    assert ids == tok.encode(tok.chat_prompt(HI))
    assert tok.apply_chat_template(HI, tokenize=False) == tok.chat_prompt(HI, add_generation_prompt=False)
    via_messages = tiny.generate(HI, max_new_tokens=5)
    via_chat_flag = tiny.generate("Hi", chat=True, max_new_tokens=5)
    via_ids = tiny.generate([ids], max_new_tokens=5)
    assert len(via_messages) == 1 and via_messages[0].prompt == HI
    assert via_messages[0].token_ids == via_chat_flag[0].token_ids == via_ids[0].token_ids
    two = tiny.generate([HI, HI + [{"role": "assistant", "content": "Yo"}, {"role": "user", "content": "?"}]],
                        max_new_tokens=3)
    assert len(two) == 2 and two[0].token_ids == via_messages[0].token_ids[:3]
    with pytest.raises(TypeError, match="message 0 is str"):
        tok.apply_chat_template(["Hi"])


def test_forward_pads_ragged_lists(tiny):
    seqs = [[5, 6, 7, 8], [9, 10], [11]]
    out = tiny.forward(seqs)                       # [B, Q, V], left-padded like the input
    assert out.shape[:2] == (3, 4)
    for i, s in enumerate(seqs):
        alone = tiny.forward([s])[0]
        torch.testing.assert_close(out[i, 4 - len(s):], alone, atol=1e-4, rtol=1e-4)
    last = tiny.forward(seqs, logits="last")
    torch.testing.assert_close(last, out[:, -1])
    with pytest.raises(ValueError, match=r"input_ids\[1\] is empty"):
        tiny.forward([[1, 2], []])


def test_logprobs_are_the_models_log_probabilities(tiny_dir, tiny):
    """Against one full forward over prompt + output, in float32: the decode steps (KV cache) and
    the full forward round differently, and in bf16 that moved a log-probability by 0.015 on an
    AVX2 machine (torch's bf16 matmuls block differently by ISA); in float32 they agree to ~1e-6."""
    f32 = moe_engine.load(tiny_dir, backend="torch", dtype="float32")
    c = f32.generate("hello", max_new_tokens=4, logprobs=3)[0]
    assert len(c.logprobs) == len(c.top_logprobs) == len(c.token_ids) == 4
    ids = f32.tokenizer.encode("hello") + c.token_ids
    lp = torch.log_softmax(f32.forward([ids])[0, :, :f32.tokenizer.vocab_size], -1)
    P = len(ids) - 4
    for s, (t, chosen, top) in enumerate(zip(c.token_ids, c.logprobs, c.top_logprobs)):
        assert math.isclose(chosen, float(lp[P - 1 + s, t]), abs_tol=1e-4)
        assert len(top) == 3 and top[0][0] == t            # greedy: the chosen one is the most likely
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    zero = tiny.generate("hello", max_new_tokens=2, logprobs=0)[0]
    assert zero.top_logprobs == [[], []] and len(zero.logprobs) == 2
    assert tiny.generate("hello", max_new_tokens=2)[0].logprobs is None


def test_n_samples_per_prompt(tiny):
    out = tiny.generate(["hello", "def f"], n=3, temperature=1.0, seed=7, max_new_tokens=6)
    assert [(c.prompt_index, c.index) for c in out] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert len({tuple(c.token_ids) for c in out[:3]}) == 3   # the samples differ
    assert out[0].token_ids == tiny.generate("hello", temperature=1.0, seed=7, max_new_tokens=6)[0].token_ids


def test_same_seed_alone_and_in_a_batch_of_4(tiny):
    kw = dict(temperature=1.0, top_p=0.95, seed=11, max_new_tokens=8)
    alone = tiny.generate("hello world", **kw)[0]
    batch = tiny.generate(["x", "hello world", "def main():", "Le chat est"], **kw)
    assert batch[1].text == alone.text and batch[1].token_ids == alone.token_ids
    per_request = tiny.generate(["x", "hello world"], [SamplingParams(seed=1), SamplingParams(**kw)])
    assert per_request[1].token_ids == alone.token_ids


def test_stop_string_is_one_string(tiny):
    full = tiny.generate("hello", max_new_tokens=12)[0].text
    stop = full[2:5]
    assert len(stop) == 3 and full.find(stop) >= 0, "the model produced too little text for this test"
    as_str = tiny.generate("hello", max_new_tokens=12, stop=stop)[0]
    as_list = tiny.generate("hello", max_new_tokens=12, stop=[stop])[0]
    assert as_str.text == as_list.text == full[:full.find(stop)] and as_str.reason == "stop"
    assert tiny.generate("hello", max_new_tokens=12, stop=None)[0].text == full


def test_nonfinite_logits_stop_with_the_step(tiny_dir):
    m = moe_engine.load(tiny_dir, backend="torch")
    m.weights.final_norm[0] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match="step 1.*NaN or Inf"):
        m.generate("hello", max_new_tokens=4)
    events = []
    with pytest.raises(NonFiniteLogitsError):
        for ev in m.iter_generate("hello", max_new_tokens=4, temperature=1.0, seed=0):
            events.append(ev)
    assert events == []  # never a token sampled from NaN


BAD_CALLS = [  # (arguments, keywords, exception, words the message must contain)
    ([b"hello"], {}, TypeError, ["prompt 0 is bytes", "expected str"]),
    (b"hello", {}, TypeError, ["bytes"]),
    ([], {}, ValueError, ["no prompts"]),
    (None, {}, TypeError, ["NoneType", "expected a string"]),
    (["ok", 3.5], {}, TypeError, ["prompt 1 is float"]),
    (["\udc80bad"], {}, ValueError, ["prompt 0", "lone surrogate", "UTF-8"]),
    ("hi", dict(max_new_tokens=2.5), TypeError, ["max_new_tokens = 2.5", "int"]),
    ("hi", dict(max_new_tokens="3"), TypeError, ["max_new_tokens = '3'", "int"]),
    ("hi", dict(max_new_tokens=0), ValueError, ["max_new_tokens = 0", ">= 1"]),
    ("hi", dict(max_new_tokens=10 ** 6), ValueError, ["1000000", "context"]),
    ("hi", dict(topk="2"), TypeError, ["topk = '2'", "expected an int"]),
    ("hi", dict(topk=99), ValueError, ["99"]),
    ("hi", dict(temperature=float("inf")), ValueError, ["temperature = inf", "finite"]),
    ("hi", dict(temperature=float("nan")), ValueError, ["temperature = nan"]),
    ("hi", dict(temperature="0.5"), TypeError, ["temperature = '0.5'"]),
    ("hi", dict(top_p=0), ValueError, ["top_p = 0"]),
    ("hi", dict(top_k="2"), TypeError, ["top_k = '2'"]),
    ("hi", dict(top_k=-1), ValueError, ["top_k = -1"]),
    ("hi", dict(seed=1e23), TypeError, ["seed = 1e+23", "int"]),
    ("hi", dict(seed=-1), ValueError, ["seed = -1"]),
    ("hi", dict(seed=2 ** 64), ValueError, ["seed = 18446744073709551616"]),
    ("hi", dict(stop=5), TypeError, ["stop = 5", "string"]),
    ("hi", dict(stop=["a", 1]), TypeError, ["stop = ['a', 1]"]),
    ("hi", dict(n=0), ValueError, ["n = 0"]),
    ("hi", dict(n=True), TypeError, ["n = True"]),
    ("hi", dict(logprobs=-1), ValueError, ["logprobs = -1"]),
    ("hi", dict(chat="yes"), TypeError, ["chat = 'yes'"]),
    ("hi", dict(sampling={"temperature": 1}), TypeError, ["sampling is dict", "SamplingParams"]),
    (["a", "b"], dict(sampling=[SamplingParams()]), ValueError, ["1 SamplingParams for 2 prompts"]),
    ("hi", dict(interventions={"topk": 1}), TypeError, ["interventions is dict"]),
    ("hi", dict(foo=1), TypeError, ["unknown keyword", "'foo'"]),
    ([[1, 2, -5]], {}, ValueError, ["-5"]),
    ([{"role": "robot", "content": "x"}], {}, ValueError, ["robot"]),
    ({"role": "user", "content": "x"}, {}, TypeError, ["one message dict"]),
]


@pytest.mark.parametrize("prompts,kw,exc,words", BAD_CALLS, ids=[repr(c[:2])[:60] for c in BAD_CALLS])
@pytest.mark.parametrize("entry", ["generate", "iter_generate", "Model.generate"])
def test_bad_arguments_raise_typed_errors_naming_the_value(tiny, entry, prompts, kw, exc, words):
    call = {"generate": lambda: generate(tiny, prompts, **kw),
            "iter_generate": lambda: iter_generate(tiny, prompts, **kw),  # raises before the first next()
            "Model.generate": lambda: tiny.generate(prompts, **kw)}[entry]
    with pytest.raises(exc) as info:
        call()
    for w in words:
        assert w in str(info.value), f"{w!r} not in {str(info.value)!r}"


def test_load_refuses_a_missing_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for dev in ("cuda", "cuda:7"):
        with pytest.raises(ValueError, match=rf"device '{dev}': no usable GPU.*expected 'cpu'"):
            moe_engine.load(device=dev)
    with pytest.raises(ValueError, match="device 'tpu'"):
        moe_engine.load(device="tpu")


@pytest.mark.parametrize("env,expected", [({}, "10000"), ({"OMP_WAIT_POLICY": "passive"}, "None"),
                                          ({"MOE_ENGINE_SPIN": "default"}, "None")])
def test_import_sets_a_short_openmp_spin_unless_the_user_chose(env, expected):
    import os
    import subprocess
    import sys
    from pathlib import Path
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MOE_ENGINE_SPIN")}
    pkg_parent = str(Path(moe_engine.__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "-c", "import os, moe_engine; print(os.environ.get('GOMP_SPINCOUNT'))"],
                       env={**base, **env, "PYTHONPATH": pkg_parent}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == expected
