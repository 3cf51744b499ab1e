"""Tokenizer on the synthetic checkpoint's byte-level BPE: round trips (non-ASCII included), BOS
handling, the exact DeepSeek chat string, StreamDecoder over characters split across tokens,
and refused ids."""

import json

import pytest

from moe_engine.config import ModelConfig
from moe_engine.synthetic import BOS_TOKEN, EOS_TOKEN, make_checkpoint
from moe_engine.tokenizer import StreamDecoder, Tokenizer

TEXTS = ["Hello world", "Hello, world!", " ", "\n", "333", "", "  two  spaces\tand\ttabs\n\n",
         "Grüße, naïve café — “quotes” …", "你好，世界！深度求索", "こんにちは 안녕하세요 Привет",
         "emoji 🙂🚀✨ and a clef 𝄞 and a rare 鱻", "def f(x):\n    return x ** 2  # ok\n"]
# Characters the tiny BPE never merged whole: each spans several byte tokens.
SPLIT_CHARS = "𝄞🚀鱻"


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return Tokenizer.from_dir(tiny_ckpt)


@pytest.fixture(scope="module")
def config(tiny_ckpt):
    return ModelConfig.from_json(tiny_ckpt / "config.json")


def test_ids_match_config(tok, config):
    assert tok.bos_id == config.bos_token_id and tok.eos_id == config.eos_token_id
    assert tok.id_to_token(tok.bos_id) == BOS_TOKEN and tok.id_to_token(tok.eos_id) == EOS_TOKEN
    # as in DeepSeek: specials after the BPE ids, and logit rows beyond len(tokenizer)
    assert len(tok) == tok.vocab_size == tok.eos_id + 1 < config.vocab_size
    assert tok.add_bos_token and tok.chat_template


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=False) == BOS_TOKEN + text
    assert tok.encode(text, add_bos=False) == ids[1:]


def test_bos_handling(tok):
    assert tok.encode("hi", add_bos=True)[0] == tok.bos_id
    assert tok.bos_id not in tok.encode("hi", add_bos=False)
    assert tok.encode(BOS_TOKEN + "hi") == tok.encode("hi")  # never doubled
    assert tok.encode(BOS_TOKEN + "hi", add_bos=False) == tok.encode("hi")  # special text -> id
    assert tok.encode("") == [tok.bos_id]


def test_digits_split(tok):
    three = tok.encode("3", add_bos=False)
    assert len(three) == 1 and tok.encode("333", add_bos=False) == three * 3


def test_chat_format_exact(tok):
    messages = [{"role": "user", "content": "Who are you?"},
                {"role": "assistant", "content": "A model."},
                {"role": "user", "content": "2+2?"}]
    expected = (f"{BOS_TOKEN}User: Who are you?\n\nAssistant: A model.{EOS_TOKEN}"
                "User: 2+2?\n\nAssistant:")
    assert tok.chat_prompt(messages) == expected
    assert tok.chat_prompt(messages, add_generation_prompt=False) == expected[:-len("Assistant:")]
    system = [{"role": "system", "content": "Be brief."}] + messages[:1]
    assert tok.chat_prompt(system) == f"{BOS_TOKEN}Be brief.\n\nUser: Who are you?\n\nAssistant:"
    ids = tok.encode(tok.chat_prompt(messages))
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id and ids.count(tok.eos_id) == 1
    assert tok.decode(ids, skip_special=False) == expected


def test_chat_format_matches_template(tok):
    jinja2 = pytest.importorskip("jinja2")
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "héllo"},
                {"role": "assistant", "content": "你好"}, {"role": "user", "content": "bye"}]
    for gen in (True, False):
        rendered = jinja2.Environment().from_string(tok.chat_template).render(
            messages=messages, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, add_generation_prompt=gen)
        assert tok.chat_prompt(messages, add_generation_prompt=gen) == rendered


@pytest.mark.parametrize("bad", [{"role": "tool", "content": "x"}, {"role": "user"},
                                 {"content": "x"}, {"role": "user", "content": 3}])
def test_chat_bad_message(tok, bad):
    with pytest.raises(ValueError, match="message 0"):
        tok.chat_prompt([bad])


def test_stream_decoder_multibyte(tok):
    text = "a 你好🙂 𝄞x🚀鱻 end"
    ids = tok.encode(text, add_bos=False)
    for ch in SPLIT_CHARS:  # the test needs characters split across tokens
        assert len(tok.encode(ch, add_bos=False)) > 1, ch
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces), pieces
    assert pieces.count("") >= sum(len(tok.encode(c, add_bos=False)) - 1 for c in SPLIT_CHARS)
    # each piece is exactly the text its tokens completed
    done = ""
    for n, p in enumerate(pieces[:-1]):
        done += p
        assert tok.decode(ids[:n + 1]).startswith(done)


def test_stream_decoder_specials_and_incomplete_tail(tok):
    dec = StreamDecoder(tok)
    clef = tok.encode("𝄞", add_bos=False)
    assert dec.push(tok.bos_id) == ""
    assert [dec.push(i) for i in clef[:-1]] == [""] * (len(clef) - 1)
    assert dec.flush() == "\ufffd"  # an unfinished character surfaces only at flush
    assert dec.flush() == ""
    dec = tok.stream_decoder(skip_special=False)
    assert dec.push(tok.eos_id) == EOS_TOKEN


def test_bad_ids(tok, config):
    for bad in (tok.vocab_size, config.vocab_size - 1, -1):
        with pytest.raises(ValueError, match=rf"token id {bad}\b.*size {tok.vocab_size}"):
            tok.decode([1, bad])
        with pytest.raises(ValueError, match=rf"token id {bad}\b"):
            tok.stream_decoder().push(bad)


def test_ids_by_id_and_missing_files(tiny_ckpt, copy_ckpt, tmp_path):
    ckpt = copy_ckpt(tiny_ckpt)
    tc = json.loads((ckpt / "tokenizer_config.json").read_text())
    del tc["bos_token"], tc["eos_token"]
    (ckpt / "tokenizer_config.json").write_text(json.dumps(tc))
    t = Tokenizer.from_dir(ckpt)  # falls back to the ids of generation_config/config.json
    config = ModelConfig.from_json(ckpt / "config.json")
    assert (t.bos_id, t.eos_id) == (config.bos_token_id, config.eos_token_id)
    tc["bos_token"] = "<not a token>"
    (ckpt / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(ValueError, match="not a token"):
        Tokenizer.from_dir(ckpt)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_larger_vocab_merges_more(tmp_path, tok):
    big = Tokenizer.from_dir(make_checkpoint(tmp_path, "tiny", layers=1,
                                             overrides={"vocab_size": 4096}))
    text = "The quick brown fox returns the value of the function."
    assert len(big.encode(text)) < len(tok.encode(text))
    assert big.decode(big.encode(text)) == text
