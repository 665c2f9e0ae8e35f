"""Extractive decoding: an answer is a span of its passage (or the no-answer text), then EOS.

The rule is on bytes, not on one tokenization: a row may emit any token sequence whose bytes,
joined, spell a contiguous piece of the passage, with one optional leading space. That is every
way a correct answer can come out of the model: " Denver Broncos" as [" Denver", " Bron", "cos"]
the way the passage tokenizes it, "Denver" alone as ["Den", "ver"], "1987" inside " 1987." as
digits, a Persian word whose characters are split across byte tokens. The passage is spelled the
way its own tokenization spells it (a normalizing tokenizer such as T5's collapses whitespace,
and the model can only write the normalized text). EOS is allowed once some non-space text is
written and only between characters; the no-answer text (data.no_answer) is allowed whole, from its start to its end. The
optional leading space may come inside the first token (" Denver") or as a token of its own.

Per passage, each byte position gets the tokens that can be written there and where each ends
(`_Spelled.table`); a row's state is the set of positions its answer so far could end at, so a
decoding step costs a few dictionary reads per row. ExtractiveSpans is a transformers
LogitsProcessor: generate applies it before temperature and top-p, on the plain, shared-prefix
and seq2seq paths alike.
"""

from __future__ import annotations

import collections
import re
import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..errors import ModelError

if TYPE_CHECKING:  # annotations only
    from transformers import PreTrainedTokenizerBase

_PROBE = "The Denver Broncos won (in 1987), not the Panthers."
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_PASSAGES_KEPT = 256  # spelled passages cached per tokenizer: the questions on one passage share it


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character that stands for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _byte_level(token: str, alphabet: dict[str, int]) -> bytes | None:
    if all(ch in alphabet for ch in token):
        return bytes(alphabet[ch] for ch in token)
    return None


def _metaspace(token: str, alphabet: dict[str, int]) -> bytes | None:
    byte = _BYTE_TOKEN.fullmatch(token)
    if byte:
        return bytes([int(byte.group(1), 16)])
    return token.replace("\u2581", " ").encode("utf-8")


class SpanVocabulary:
    """The bytes each token of a tokenizer writes, and the passages spelled in them.

    Raises:
        ModelError: the tokenizer's tokens cannot be read as bytes (neither byte-level BPE nor
            SentencePiece-style), so no span can be checked.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.token_bytes = _token_bytes(tokenizer)
        self.ids_by_bytes: dict[bytes, list[int]] = {}
        self.prefixes: set[bytes] = set()
        for token_id, spelled in enumerate(self.token_bytes):
            if spelled:
                self.ids_by_bytes.setdefault(spelled, []).append(token_id)
                self.prefixes.update(spelled[:k] for k in range(1, len(spelled) + 1))
        self._cache: collections.OrderedDict[tuple[str, bool], list[_Spelled]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def bytes_of(self, token_id: int) -> bytes | None:
        return self.token_bytes[token_id] if 0 <= token_id < len(self.token_bytes) else None

    def segments(self, text: str, *, whole: bool = False) -> list[_Spelled]:
        """`text` spelled the way its own tokenization writes it, as segments of bytes (split where
        a token writes no bytes: a character the tokenizer does not know). whole: one segment,
        to be written from its start to its end (the no-answer text)."""
        key = (text, whole)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        pieces: list[bytes] = [b""]
        for token_id in self.tokenizer(text, add_special_tokens=False)["input_ids"]:
            spelled = self.bytes_of(token_id)
            if spelled:
                pieces[-1] += spelled
            elif pieces[-1]:
                pieces.append(b"")
        if whole:
            pieces = [b"".join(pieces)]
        segments = [_Spelled(self, piece, whole) for piece in pieces if piece]
        with self._lock:
            self._cache[key] = segments
            while len(self._cache) > _PASSAGES_KEPT:
                self._cache.popitem(last=False)
        return segments


class _Spelled:
    """One segment of bytes: table[p] = {token id: end position} for the tokens that can be
    written at byte position p; start = {token id: [end positions]} for a row's first token."""

    def __init__(self, vocab: SpanVocabulary, data: bytes, whole: bool):
        self.data = data
        self.whole = whole
        self.table = [_matches(vocab, data, p) for p in range(len(data) + 1)]
        # an answer starts and ends between characters, never inside a multi-byte UTF-8 one
        self.boundary = [p == len(data) or (data[p] & 0xC0) != 0x80 for p in range(len(data) + 1)]
        starts = [0] if whole else [p for p in range(len(data)) if self.boundary[p]]
        self.start: dict[int, list[int]] = {}
        self.plain_start: dict[int, list[int]] = {}  # after a space token of its own: no second space
        for p in starts:
            for token_id, end in self.table[p].items():
                self.start.setdefault(token_id, []).append(end)
                if data[p : p + 1] != b" ":
                    self.plain_start.setdefault(token_id, []).append(end)
        for p in starts:
            if p == 0 or data[p - 1 : p] != b" ":  # a leading space the text does not have here
                for token_id, end in _matches(vocab, data, p, lead=b" ").items():
                    self.start.setdefault(token_id, []).append(end)

    def can_end(self, position: int) -> bool:
        return position == len(self.data) if self.whole else position > 0 and self.boundary[position]


def _matches(vocab: SpanVocabulary, data: bytes, position: int, lead: bytes = b"") -> dict[int, int]:
    """{token id: end position} for every token whose bytes are lead + data[position:end]."""
    found: dict[int, int] = {}
    end = position + 1
    while end <= len(data):
        piece = lead + data[position:end]
        if piece not in vocab.prefixes:
            break
        for token_id in vocab.ids_by_bytes.get(piece, ()):
            found[token_id] = end
        end += 1
    return found


def _token_bytes(tokenizer: PreTrainedTokenizerBase) -> list[bytes | None]:
    """The bytes each token id writes (None: special tokens, which no answer contains), read the
    byte-level way or the SentencePiece way, whichever spells a probe sentence back exactly."""
    size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}
    alphabet = _byte_alphabet()
    probe = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    for read in (_byte_level, _metaspace):
        spelled: list[bytes | None] = []
        for token_id, token in enumerate(tokens):
            if token_id in special or token is None:
                spelled.append(None)
            elif token_id in added:  # an added token is stored as its own text
                spelled.append(str(added[token_id].content).encode("utf-8"))
            else:
                spelled.append(read(token, alphabet))
        if all(spelled[i] is not None or i in special for i in probe) and _spells(spelled, probe):
            return spelled
    raise ModelError(
        f"extractive decoding cannot read the tokens of {type(tokenizer).__name__} as bytes.",
        hint="turn it off: eval.extractive=false when training, or --no-extractive",
    )


def _spells(spelled: list[bytes | None], probe: list[int]) -> bool:
    """The probe's tokens spell the probe sentence (a leading space added is allowed); an unknown
    token (no bytes) stands for at least one character."""
    pattern = re.compile(b"".join(re.escape(spelled[i] or b"") or b".+?" for i in probe), flags=re.DOTALL)
    text = _PROBE.encode("utf-8")
    return any(pattern.fullmatch(candidate) for candidate in (text, b" " + text))


_VOCABULARIES: weakref.WeakKeyDictionary[Any, SpanVocabulary] = weakref.WeakKeyDictionary()
_VOCABULARIES_LOCK = threading.Lock()


def span_vocabulary(tokenizer: PreTrainedTokenizerBase) -> SpanVocabulary:
    """The tokenizer's SpanVocabulary, built once (0.4 s for SmolLM2's 49k tokens on one CPU core)."""
    with _VOCABULARIES_LOCK:
        vocab = _VOCABULARIES.get(tokenizer)
        if vocab is None:
            vocab = _VOCABULARIES[tokenizer] = SpanVocabulary(tokenizer)
        return vocab


class _Row:
    """One row's constraint: its segments, and the (segment, end position) pairs its answer so
    far can end at (None before the first token)."""

    def __init__(self, segments: list[_Spelled], eos: list[int], spaces: list[int]):
        self.segments = segments
        self.eos = eos
        self.spaces = spaces  # the tokens that write a single space
        self.state: set[tuple[int, int]] | None = None
        self.spaced = False  # a space token came first: the answer starts at the next token
        self.has_text = False

    def advance(self, token_id: int, token_bytes: bytes | None) -> None:
        state: set[tuple[int, int]] = set()
        if self.state is None and token_bytes == b" " and not self.spaced:
            self.spaced = True
            return
        if self.state is None:
            for s, segment in enumerate(self.segments):
                starts = segment.plain_start if self.spaced else segment.start
                state.update((s, end) for end in starts.get(token_id, ()))
        else:
            for s, position in self.state:
                end = self.segments[s].table[position].get(token_id)
                if end is not None:
                    state.add((s, end))
        self.state = state
        if token_bytes and token_bytes.strip():
            self.has_text = True

    def allowed(self) -> list[int]:
        tokens: set[int] = set()
        if self.state is None:
            for segment in self.segments:
                tokens.update(segment.plain_start if self.spaced else segment.start)
            if not self.spaced:
                tokens.update(self.spaces)
            return list(tokens)
        can_end = False
        for s, position in self.state:
            segment = self.segments[s]
            tokens.update(segment.table[position])
            can_end = can_end or segment.can_end(position)
        if (can_end and self.has_text) or not self.state:  # a dead end (never taken) may only stop
            tokens.update(self.eos)
        return list(tokens)


class ExtractiveSpans(LogitsProcessor):
    """Keeps each constrained row of a generate call inside its passage (see the module docstring).

    Args:
        vocab: the tokenizer's span_vocabulary.
        passages: one per batch row; None leaves that row free.
        no_answer: the text an unanswerable question is answered with (allowed whole), or None.
        eos_ids: the ids that end a row.
    """

    def __init__(
        self, vocab: SpanVocabulary, passages: Sequence[str | None], no_answer: str | None, eos_ids: Iterable[int]
    ):
        self.vocab = vocab
        eos = sorted(set(eos_ids))
        tail = vocab.segments(no_answer, whole=True) if no_answer else []
        spaces = vocab.ids_by_bytes.get(b" ", [])
        self.rows = [None if p is None else _Row(vocab.segments(p) + tail, eos, spaces) for p in passages]
        self.steps = 0

    def keep_rows(self, indices: Sequence[int]) -> None:
        """Only these batch rows remain (inference.greedy drops finished rows)."""
        self.rows = [self.rows[i] for i in indices]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.steps:
            last = input_ids[:, -1].tolist()
            for row, token_id in zip(self.rows, last):
                if row is not None:
                    row.advance(token_id, self.vocab.bytes_of(token_id))
        rows: list[int] = []
        cols: list[int] = []
        free = []
        for r, row in enumerate(self.rows):
            if row is None:
                free.append(r)
                continue
            allowed = row.allowed()
            rows += [r] * len(allowed)
            cols += allowed
        self.steps += 1
        if not rows and not cols and len(free) == len(self.rows):
            return scores
        # copy the allowed scores into a -inf tensor: cheaper than a full-size mask (a third of the time)
        out = torch.full_like(scores, float("-inf"))
        if free:
            out[free] = scores[free]
        r_at, c_at = torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)
        inside = c_at < scores.shape[-1]  # a tokenizer may have more ids than the model's output
        at = (r_at[inside].to(scores.device), c_at[inside].to(scores.device))
        out[at] = scores[at]
        return out  # type: ignore[return-value]


def spans_processor(
    tokenizer: PreTrainedTokenizerBase, passages: Sequence[str | None], no_answer: str | None, eos_ids: Iterable[int]
) -> dict[str, Any]:
    """generate's keyword arguments that keep each row with a passage inside it ({} when no row has one)."""
    if all(p is None for p in passages):
        return {}
    processor = ExtractiveSpans(span_vocabulary(tokenizer), passages, no_answer, eos_ids)
    return {"logits_processor": LogitsProcessorList([processor])}
