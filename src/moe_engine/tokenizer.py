"""Tokenizer of a DeepSeekMoE checkpoint directory: encode, decode, chat prompt, streaming decode.

Reads `tokenizer.json` with the `tokenizers` library (the DeepSeek tokenizer is fast-only,
byte-level BPE) and `tokenizer_config.json` for BOS/EOS (given by content or by id),
`add_bos_token` and the chat template. BOS is added here, not by the tokenizer.json
post-processor, so `encode` behaves the same whatever post-processor a file carries.

`vocab_size` is len(tokenizer) (100015 for DeepSeekMoE), which may be smaller than the model's
config.vocab_size (102400): logit rows beyond it belong to no token, and ids there are refused
with a ValueError naming the id and the vocabulary size.

Byte-level BPE tokens can end in the middle of a UTF-8 character (a CJK character or an emoji
may span two or more tokens), so streaming uses `StreamDecoder`, which only ever returns
completed characters.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

# Held back while the decoded tail ends in an incomplete UTF-8 sequence (decoded as U+FFFD).
_REPLACEMENT = "\ufffd"
CHAT_ROLES = ("system", "user", "assistant")


class Tokenizer:
    """Encode/decode for one checkpoint; build with `Tokenizer.from_dir(path)`."""

    def __init__(self, tok: _HFTokenizer, *, bos_id: int | None, eos_id: int | None,
                 add_bos_token: bool = True, chat_template: str | None = None,
                 source: str = "<tokenizer>") -> None:
        self._tok = tok
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        self.source = source
        for name, i in (("bos", bos_id), ("eos", eos_id)):
            if i is not None and not 0 <= i < self.vocab_size:
                raise ValueError(f"{source}: {name} id {i} outside the vocabulary "
                                 f"(size {self.vocab_size})")
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Read tokenizer.json + tokenizer_config.json (ids fall back to config.json /
        generation_config.json when tokenizer_config.json names no BOS/EOS)."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file}: not found (only fast tokenizers, "
                                    "tokenizer.json, are supported)")
        try:
            tok = _HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise ValueError(f"{tok_file}: cannot parse tokenizer ({e})") from None
        cfg = _read_json(path / "tokenizer_config.json")
        fallbacks = [_read_json(path / "generation_config.json"), _read_json(path / "config.json")]

        def special_id(kind: str) -> int | None:
            token = cfg.get(f"{kind}_token")
            if isinstance(token, dict):  # serialized AddedToken
                token = token.get("content")
            if isinstance(token, str):
                i = tok.token_to_id(token)
                if i is None:
                    raise ValueError(f"{path / 'tokenizer_config.json'}: {kind}_token "
                                     f"{token!r} is not in {tok_file}")
                return i
            for d in (cfg, *fallbacks):
                if isinstance(d.get(f"{kind}_token_id"), int):
                    return d[f"{kind}_token_id"]
            return None

        bos = special_id("bos")
        return cls(tok, bos_id=bos, eos_id=special_id("eos"),
                   add_bos_token=bool(cfg.get("add_bos_token", bos is not None)),
                   chat_template=cfg.get("chat_template"), source=str(path))

    def __len__(self) -> int:
        return self.vocab_size

    # ---- encode / decode ----------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`. add_bos=None follows `add_bos_token`. A BOS is never doubled:
        text that already starts with the BOS token (e.g. a `chat_prompt`) keeps just that one.
        Special-token text inside `text` encodes to the special id."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos is None:
            add_bos = self.add_bos_token
        if add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = list(ids)
        self.check_ids(ids)
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def check_ids(self, ids: Sequence[int]) -> None:
        """ValueError naming the first id outside 0..vocab_size-1 (e.g. a logit row past
        len(tokenizer), which the model can emit but which belongs to no token)."""
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i!r} outside the tokenizer vocabulary "
                                 f"(valid ids 0..{self.vocab_size - 1}, size {self.vocab_size})")

    def id_to_token(self, i: int) -> str:
        self.check_ids([i])
        return self._tok.id_to_token(i)

    # ---- chat ---------------------------------------------------------------------------------

    def chat_prompt(self, messages: Sequence[dict[str, str]],
                    add_generation_prompt: bool = True) -> str:
        """The DeepSeek chat format (deepseek-moe-16b-chat's chat_template, in Python):
        `<BOS>` then per message: system `{content}\\n\\n`, user `User: {content}\\n\\n`,
        assistant `Assistant: {content}<EOS>`; then `Assistant:` if add_generation_prompt.
        Encode the result with `encode(prompt)`: the BOS it starts with is not doubled."""
        if self.bos_id is None or self.eos_id is None:
            raise ValueError(f"{self.source}: the chat format needs BOS and EOS tokens")
        bos, eos = self._tok.id_to_token(self.bos_id), self._tok.id_to_token(self.eos_id)
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise TypeError(f"messages is {type(messages).__name__}; expected a list of "
                            "{'role': ..., 'content': ...} dicts")
        parts = [bos]
        for n, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise TypeError(f"message {n} is {type(m).__name__}; expected a dict with 'role' and 'content'")
            role, content = m.get("role"), m.get("content")
            if role not in CHAT_ROLES or not isinstance(content, str):
                raise ValueError(f"message {n}: need role in {CHAT_ROLES} and a string content, "
                                 f"got role={role!r}, content of type {type(content).__name__}")
            if role == "system":
                parts.append(content + "\n\n")
            elif role == "user":
                parts.append(f"User: {content}\n\n")
            else:
                parts.append(f"Assistant: {content}{eos}")
        if add_generation_prompt:
            parts.append("Assistant:")
        return "".join(parts)

    def apply_chat_template(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = False,
                            tokenize: bool = True) -> list[int] | str:
        """transformers' `tokenizer.apply_chat_template(messages)`, same defaults: the token ids of
        the conversation in the chat format (`tokenize=False`: the text, see `chat_prompt`); pass
        `add_generation_prompt=True` to end with the assistant's turn for generation."""
        text = self.chat_prompt(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text) if tokenize else text

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special=skip_special)


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns only newly completed text (never half of a
    UTF-8 character), `flush()` returns what is left (an incomplete tail as U+FFFD).

    It re-decodes a short window of tokens (those since the last emitted boundary) and emits the
    difference; text whose decoding ends in U+FFFD is held until the next token completes it.
    Works with any tokenizers decoder, not only byte-level."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self._ids: list[int] = []  # tokens since the start of the decoding window
        self._read = 0             # _ids[:_read] is text already returned

    def _text(self, ids: list[int]) -> str:
        return self._tok._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        self._tok.check_ids([token_id])
        self._ids.append(token_id)
        done = self._text(self._ids[:self._read])
        text = self._text(self._ids)
        if len(text) > len(done) and not text.endswith(_REPLACEMENT):
            # The window restarts at the last emitted token, which keeps context for decoders
            # whose output depends on the previous token (e.g. leading-space rules).
            self._ids = self._ids[self._read:]
            self._read = len(self._ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        done = self._text(self._ids[:self._read])
        text = self._text(self._ids)
        self._ids, self._read = [], 0
        return text[len(done):]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    return d if isinstance(d, dict) else {}
