"""A deterministic byte-level tokenizer for serving the reference models over HTTP.

The reference models have random weights, so any mapping text <-> ids within the vocabulary
serves; this one is simple enough to reason about in a test and round-trips text:

    ids 0..7          special tokens: <pad> <s> </s> <|system|> <|user|> <|assistant|> <|end|> <unk>
    ids 8..263        one UTF-8 byte each (id = 8 + byte)
    ids 264..V-1      "extra" tokens, written as the text <|id|>; encode(..., parse_special=True) reads them back

decode(encode(text)) == text for any str. Decoding skips the special tokens by default (as
vLLM's skip_special_tokens); invalid UTF-8 from random bytes becomes U+FFFD. A stop string
maps to a stop token id exactly when it is one token: a single byte ("\\n", "."), a special
token's text or an extra token's <|id|> (see single_token).

Chat template (a generation prompt for the assistant):

    <s> <|system|> ...bytes... <|end|> <|user|> ...bytes... <|end|> <|assistant|>
"""
from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Sequence

from reference.errors import ConfigError

SPECIALS = ("<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<unk>")
PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END, UNK = range(len(SPECIALS))
BYTE_OFFSET = len(SPECIALS)  # id of byte 0
MIN_VOCAB = BYTE_OFFSET + 256
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT, "developer": SYSTEM}

_SPECIAL_RE = re.compile(r"<\|(\d+)\|>|" + "|".join(re.escape(s) for s in SPECIALS))


class ByteTokenizer:
    """Bytes as tokens, a few specials, and <|id|> text for the rest of the vocabulary."""

    def __init__(self, vocab_size: int):
        if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
            raise ConfigError("vocab_size", f"a byte tokenizer needs at least {MIN_VOCAB} ids, got {vocab_size!r}",
                              f">= {MIN_VOCAB}")
        self.vocab_size = vocab_size
        self.bos_id, self.eos_id = BOS, EOS

    # ------------------------------------------------------------------ text -> ids
    def encode(self, text: str, *, add_bos: bool = False, parse_special: bool = False) -> list[int]:
        """Token ids of text (one per UTF-8 byte); with parse_special, <|id|> and special names become their ids."""
        ids = [BOS] if add_bos else []
        if not parse_special:
            return ids + [BYTE_OFFSET + b for b in text.encode("utf-8")]
        pos = 0
        for m in _SPECIAL_RE.finditer(text):
            tid = self._special_id(m)
            if tid is None:
                continue
            ids += [BYTE_OFFSET + b for b in text[pos:m.start()].encode("utf-8")]
            ids.append(tid)
            pos = m.end()
        return ids + [BYTE_OFFSET + b for b in text[pos:].encode("utf-8")]

    def _special_id(self, m: re.Match) -> int | None:
        if m.group(1) is not None:
            tid = int(m.group(1))
            return tid if MIN_VOCAB <= tid < self.vocab_size else None
        return SPECIALS.index(m.group(0))

    def single_token(self, text: str) -> int | None:
        """The one token whose text is exactly text, or None (then a stop string is matched on the text)."""
        ids = self.encode(text, parse_special=True)
        return ids[0] if len(ids) == 1 else None

    def apply_chat_template(self, messages: Sequence[dict]) -> list[int]:
        """<s>, then <|role|> content <|end|> per message, then <|assistant|> (the generation prompt).

        messages: dicts with role (system | developer | user | assistant) and content (str, or a
        list of {"type": "text", "text": ...} parts). Raises ConfigError naming messages[i].
        """
        ids = [BOS]
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise ConfigError(f"messages[{i}]", f"must be an object with role and content, got {msg!r}")
            role = msg.get("role")
            if role not in ROLES:
                raise ConfigError(f"messages[{i}].role", f"unknown role {role!r}", ", ".join(ROLES))
            ids.append(ROLES[role])
            ids += self.encode(_content_text(msg.get("content"), f"messages[{i}].content"))
            ids.append(END)
        ids.append(ASSISTANT)
        return ids

    # ------------------------------------------------------------------ ids -> text
    def token_text(self, tid: int) -> str:
        """The text of a non-byte token (specials by name, extras as <|id|>)."""
        return SPECIALS[tid] if tid < BYTE_OFFSET else f"<|{tid}|>"

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Text of ids (the same text as concatenating a StreamDecoder's pieces)."""
        dec = StreamDecoder(self, skip_special=skip_special)
        return "".join(dec.push(t) for t in ids) + dec.flush()


class StreamDecoder:
    """Incremental ids -> text: a multi-byte character is emitted once its last byte arrives."""

    def __init__(self, tokenizer: ByteTokenizer, *, skip_special: bool = True):
        self.tok = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, tid: int) -> str:
        """The new text that token tid completes (possibly '')."""
        if BYTE_OFFSET <= tid < MIN_VOCAB:
            return self._utf8.decode(bytes([tid - BYTE_OFFSET]))
        pending = self.flush()  # a non-byte token ends any partial character
        if tid < BYTE_OFFSET and self.skip_special:
            return pending
        return pending + self.tok.token_text(tid)

    def flush(self) -> str:
        """Whatever partial character is pending (as U+FFFD)."""
        return self._utf8.decode(b"", final=True)


class TextStream:
    """Streamed ids -> text deltas with stop strings: the text stops before the first stop string.

    Text that could be the start of a stop string is held back until it cannot be, so no
    emitted delta ever has to be taken back (as vLLM and the OpenAI API behave).
    """

    def __init__(self, tokenizer: ByteTokenizer, stop: Sequence[str] = ()):
        self.dec = StreamDecoder(tokenizer)
        self.stop = [s for s in stop if s]
        self.text = ""  # all text decoded so far
        self.sent = 0  # characters of text already emitted
        self.stopped = False

    def push(self, tid: int) -> str:
        """The delta to emit after token tid; sets .stopped when a stop string appeared."""
        if self.stopped:
            return ""
        self.text += self.dec.push(tid)
        return self._emit(final=False)

    def finish(self) -> str:
        """The last delta once the request ended (held-back text is released)."""
        if self.stopped:
            return ""
        self.text += self.dec.flush()
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        end = len(self.text)
        if self.stop:
            start = max(0, self.sent - max(map(len, self.stop)) + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                self.stopped = True
            elif not final:
                end -= self._held(self.text)
        end = max(end, self.sent)
        delta, self.sent = self.text[self.sent:end], end
        return delta

    def _held(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of some stop string."""
        for k in range(min(len(text), max(map(len, self.stop)) - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0


def _content_text(content, field: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ConfigError(f"{field}[{j}]", "only text parts are supported", '{"type": "text", "text": ...}')
            parts.append(part["text"])
        return "".join(parts)
    raise ConfigError(field, f"must be a string or a list of text parts, got {content!r}")
