"""Corpora for the lens analyses: domains, documents, samples (chunks) and padded batches.

A *domain* is one PATH of the command line (a file or a directory, labelled by its name, or
`NAME=PATH`), a list of texts, or a list of token-id lists. A *document* is one unit of text:

    .jsonl          one record per line: "text" | "content" | question + answer (GSM8K) |
                    context + question + answers (SQuAD / FQuAD records)
    .json           a SQuAD-format file ({"data": [{"paragraphs": [{"context", "qas"}]}]}: one
                    document per question: context + question + first answer) or a list of records
    anything else   split="file": the whole file (read in blocks, so a multi-GB book streams with
                    bounded memory); "line": every non-empty line; "paragraph": blank-line blocks

A *sample* is a chunk of a document's tokens, at most `max_len` tokens (default 2048, or the
model's context if shorter) including the BOS that starts every chunk when the tokenizer adds BOS.
Per-sample perplexity and the geometric mean over samples are computed on these.

Everything is a generator: a corpus far larger than memory flows through in batches.
Shape legend: B samples in a batch, Q the batch's longest sample.
"""
from __future__ import annotations

import json
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model import left_pad

MAX_LEN = 2048                # tokens per sample, as in the paper's evaluation
READ_BLOCK = 1 << 20          # characters read at a time from a large plain-text file
MAX_JSON_BYTES = 256 << 20    # a .json corpus is parsed whole; larger ones must be .jsonl
MAX_RECORD_CHARS = 64 << 20   # one .jsonl record is parsed whole too
SPLITS = ("file", "line", "paragraph")
_SKIP_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".pdf", ".gz", ".zip", ".bin", ".pt",
                  ".safetensors", ".npy", ".parquet", ".arrow"}


@dataclass(frozen=True)
class Domain:
    """A named source of documents: files, or in-memory texts, or token-id samples."""
    name: str
    files: tuple[Path, ...] = ()
    texts: tuple[str, ...] | None = None
    token_ids: tuple[tuple[int, ...], ...] | None = None


def domain_from_path(arg: str | Path) -> Domain:
    """`PATH` or `NAME=PATH`; a directory contributes its files (recursively, sorted, hidden
    files and binary formats skipped); the label is the file's stem or the directory's name."""
    s = str(arg)
    name = None
    if "=" in s and not Path(s).exists():
        name, s = s.split("=", 1)
    p = Path(s)
    if not p.exists():
        raise FileNotFoundError(f"corpus path {p} does not exist")
    if not p.is_dir():
        _regular(p)
    if p.is_dir():
        files = tuple(f for f in sorted(p.rglob("*")) if f.is_file()
                      and not any(part.startswith(".") for part in f.relative_to(p).parts)
                      and f.suffix.lower() not in _SKIP_SUFFIXES)
        if not files:
            raise ValueError(f"corpus directory {p} holds no text files")
        return Domain(name or p.name, files)
    return Domain(name or p.stem, (p,))


def _regular(p: Path) -> None:
    """A corpus file must be a regular file: /dev/zero or a FIFO would be read forever."""
    mode = p.stat().st_mode
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise ValueError(f"corpus path {p} is {kind}; expected a regular file or a directory")


def as_domains(domains) -> list[Domain]:
    """Normalise what the analyses accept: a Domain, a path, a list of those, or a mapping
    name -> path | [texts] | [[token ids]] (a single text goes in a list: a bare string is a
    path, and a missing path is an error)."""
    if isinstance(domains, (Domain, str, Path)):
        domains = [domains]
    out: list[Domain] = []
    if isinstance(domains, Mapping):
        for name, src in domains.items():
            if isinstance(src, Domain):
                out.append(Domain(name, src.files, src.texts, src.token_ids))
            elif isinstance(src, (str, Path)):  # a path (a typo must not become a "text")
                out.append(Domain(name, domain_from_path(src).files))
            elif isinstance(src, Sequence) and src and all(isinstance(x, str) for x in src):
                out.append(Domain(name, texts=tuple(src)))
            elif (isinstance(src, Sequence) and src
                  and all(isinstance(x, (Sequence, torch.Tensor)) for x in src)):
                out.append(Domain(name, token_ids=tuple(tuple(int(i) for i in x) for x in src)))
            else:
                raise TypeError(f"domain {name!r}: expected a path, a list of texts or a list of "
                                f"token-id lists, got {type(src).__name__}")
    else:
        out = [d if isinstance(d, Domain) else domain_from_path(d) for d in domains]
    names = [d.name for d in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"two domains share the label(s) {sorted(dup)}; label them with NAME=PATH")
    if not out:
        raise ValueError("no domains given")
    return out


# ---- documents ------------------------------------------------------------------------------

def record_text(rec) -> str | None:
    """The text of one JSON record (None when it has none we recognise)."""
    if isinstance(rec, str):
        return rec
    if not isinstance(rec, Mapping):
        return None
    for key in ("text", "content"):
        if isinstance(rec.get(key), str):
            return rec[key]
    if isinstance(rec.get("question"), str) and isinstance(rec.get("answer"), str):   # GSM8K
        return rec["question"] + "\n" + rec["answer"]
    if isinstance(rec.get("context"), str) and isinstance(rec.get("question"), str):  # SQuAD row
        ans = rec.get("answers")
        first = ""
        if isinstance(ans, Mapping) and ans.get("text"):
            first = ans["text"][0]
        elif isinstance(ans, list) and ans:
            first = ans[0].get("text", "") if isinstance(ans[0], Mapping) else str(ans[0])
        return f"{rec['context']}\n{rec['question']}\n{first}".rstrip("\n")
    return None


def _squad_documents(obj, path: Path) -> Iterator[str]:
    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: not a SQuAD-format file ({what}); expected "
                          '{"data": [{"paragraphs": [{"context": str, "qas": [{"question": str}]}]}]}')
    if not isinstance(obj["data"], list):
        raise bad("'data' is not a list")
    for article in obj["data"]:
        if not isinstance(article, Mapping) or not isinstance(article.get("paragraphs", []), list):
            raise bad("an article is not an object with a 'paragraphs' list")
        for para in article.get("paragraphs", []):
            if not isinstance(para, Mapping) or not isinstance(para.get("context"), str) \
                    or not isinstance(para.get("qas", []), list):
                raise bad("a paragraph has no 'context' string or 'qas' list")
            for qa in para.get("qas", []):
                if not isinstance(qa, Mapping) or not isinstance(qa.get("question"), str):
                    raise bad("a qas entry has no 'question' string")
                yield record_text({"context": para["context"], "question": qa["question"],
                                   "answers": qa.get("answers", [])})


def _bounded_lines(f) -> Iterator[tuple[str, bool]]:
    """(piece, ends_line) with pieces of at most READ_BLOCK characters: a file that is one
    64 MB line streams in blocks instead of becoming one string (and one token list)."""
    piece = f.readline(READ_BLOCK)
    while piece:
        after = f.readline(READ_BLOCK)  # one ahead: the file's last line ends without a newline
        nl = piece.endswith("\n")
        yield (piece[:-1] if nl else piece), nl or not after
        piece = after


def _cut(text: str) -> int:
    """Where to cut a long run without newlines: after its last whitespace (a word stays
    whole for the tokenizer), else at READ_BLOCK."""
    at = max(text.rfind(" ", 0, READ_BLOCK), text.rfind("\t", 0, READ_BLOCK)) + 1
    return at if at > 0 else READ_BLOCK


def iter_file_blocks(path: Path, split: str) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces of a plain-text file; a "file" document arrives in blocks
    cut after a newline so memory stays bounded."""
    _regular(path)
    with open(path, encoding="utf-8", errors="replace") as f:
        if split == "line":
            started = False  # a line longer than READ_BLOCK arrives in pieces, one document
            for piece, ends in _bounded_lines(f):
                if piece.strip() or (started and (piece or ends)):
                    started = not ends
                    yield piece, ends
            return
        if split == "paragraph":
            buf: list[str] = []
            size, partial = 0, False  # partial: pieces of this paragraph already went out
            sep = ""                  # the newline between two lines of a paragraph
            for piece, ends in _bounded_lines(f):
                if piece.strip() or not ends:
                    buf.append(sep + piece)
                    sep = "\n" if ends else ""
                    size += len(piece)
                    if size >= READ_BLOCK:  # a huge paragraph streams in pieces
                        yield "".join(buf), False
                        buf, size, partial = [], 0, True
                elif buf or partial:
                    yield "".join(buf), True
                    buf, size, partial, sep = [], 0, False, ""
            if buf or partial:
                yield "".join(buf), True
            return
        carry = ""
        while True:
            block = f.read(READ_BLOCK)
            if not block:
                yield carry, True   # even when empty: it ends the document
                return
            text = carry + block
            cut = text.rfind("\n") + 1
            if cut == 0:
                if len(text) < READ_BLOCK:
                    carry = text
                    continue
                cut = _cut(text)  # no newline for a whole block: cut anyway (bounded memory)
            yield text[:cut], False
            carry = text[cut:]


def iter_text_pieces(domain: Domain, split: str = "file") -> Iterator[tuple[str, bool]]:
    """(text, ends_document) over the whole domain."""
    if split not in SPLITS:
        raise ValueError(f"split = {split!r}; expected one of {SPLITS}")
    if domain.texts is not None:
        for t in domain.texts:
            yield t, True
        return
    for path in domain.files:
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            _regular(path)
            found = False
            with open(path, encoding="utf-8", errors="replace") as f:
                for i, line in enumerate(iter(lambda: f.readline(MAX_RECORD_CHARS + 1), "")):
                    if len(line) > MAX_RECORD_CHARS:
                        raise ValueError(f"{path}:{i + 1}: a record longer than {MAX_RECORD_CHARS} characters")
                    if not line.strip():
                        continue
                    try:
                        text = record_text(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{i + 1}: not valid JSON ({e})") from None
                    if text is None:
                        raise ValueError(f"{path}:{i + 1}: a record without text; expected a string or an object "
                                         "with 'text', 'content', question + answer or context + question")
                    found = True
                    if text:
                        yield text, True
            if not found:
                raise ValueError(f"{path}: holds no JSON records")
        elif suffix == ".json":
            _regular(path)
            if path.stat().st_size > MAX_JSON_BYTES:
                raise ValueError(f"{path}: {path.stat().st_size} bytes is too large to parse as one JSON "
                                 f"document (limit {MAX_JSON_BYTES}); write it as .jsonl, one record per line")
            try:
                obj = json.loads(path.read_text(encoding="utf-8", errors="replace"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
            if isinstance(obj, Mapping) and "data" in obj:
                docs = _squad_documents(obj, path)
            elif isinstance(obj, list):
                docs = (record_text(r) for r in obj)
            else:
                docs = iter([record_text(obj)])
            found = False
            for text in docs:
                if text is None:
                    raise ValueError(f"{path}: a record without text; expected a SQuAD file, or a list of "
                                     "strings or objects with 'text', 'content', question + answer or "
                                     "context + question")
                found = True
                if text:
                    yield text, True
            if not found:
                raise ValueError(f"{path}: holds no records")
        else:
            yield from iter_file_blocks(path, split)


# ---- samples and batches ----------------------------------------------------------------------

def iter_samples(domain: Domain, tokenizer, max_len: int = MAX_LEN, *, split: str = "file",
                 max_samples: int | None = None, max_tokens: int | None = None,
                 progress=None) -> Iterator[list[int]]:
    """Token-id samples of at most `max_len` tokens. Every sample starts with BOS when the
    tokenizer adds one; a document longer than a sample continues in the next one; a trailing
    piece shorter than 2 tokens (nothing to predict) is dropped. `progress` (a tqdm bar) is
    advanced by the UTF-8 bytes consumed."""
    for name, v, lo in (("max_len", max_len, 1), ("max_samples", max_samples, 1), ("max_tokens", max_tokens, 2)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            raise ValueError(f"{name} = {v!r}; expected an integer >= {lo}" + ("" if name == "max_len" else " or None"))
    if domain.token_ids is not None:
        n = 0
        for ids in domain.token_ids:
            for lo in range(0, len(ids), max_len):
                if max_samples is not None and n >= max_samples:
                    return
                chunk = list(ids[lo:lo + max_len])
                if len(chunk) >= 1:
                    n += 1
                    yield chunk
        return
    if tokenizer is None:
        raise ValueError(f"domain {domain.name!r} is text but the model has no tokenizer")
    bos = [tokenizer.bos_id] if tokenizer.add_bos_token and tokenizer.bos_id is not None else []
    body = max_len - len(bos)
    if body < 1:
        raise ValueError(f"max_len = {max_len} leaves no room for tokens after BOS")
    n_samples = n_tokens = 0
    pending: list[int] = []
    for text, ends in iter_text_pieces(domain, split):
        if progress is not None:
            progress.update(len(text.encode("utf-8")))
        pending += tokenizer.encode(text, add_bos=False)
        while len(pending) >= body or (ends and pending):
            chunk, pending = pending[:body], pending[body:]
            sample = bos + chunk
            if len(sample) < 2:
                continue
            if max_tokens is not None and n_tokens + len(sample) > max_tokens:
                sample = sample[:max_tokens - n_tokens]
                if len(sample) < 2:
                    return
            yield sample
            n_samples += 1
            n_tokens += len(sample)
            if (max_samples is not None and n_samples >= max_samples) or \
               (max_tokens is not None and n_tokens >= max_tokens):
                return
        if ends:
            pending = []


@dataclass
class Batch:
    input_ids: torch.Tensor       # [B, Q] int64, left-padded with 0
    attention_mask: torch.Tensor  # [B, Q] bool
    lengths: list[int]            # real tokens per sample


def iter_batches(samples: Iterable[list[int]], batch_tokens: int, device) -> Iterator[Batch]:
    """Group samples into left-padded batches of at most `batch_tokens` padded tokens (a
    single longer sample goes alone)."""
    group: list[list[int]] = []
    longest = 0
    for s in samples:
        new_longest = max(longest, len(s))
        if group and new_longest * (len(group) + 1) > batch_tokens:
            yield _pad(group, device)
            group, new_longest = [], len(s)
        group.append(s)
        longest = new_longest
    if group:
        yield _pad(group, device)


def _pad(group: list[list[int]], device) -> Batch:
    ids, mask = left_pad(group, device)
    return Batch(ids, mask, [len(s) for s in group])
