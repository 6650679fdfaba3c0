"""Token ids -> text as a request streams: incremental detokenization and stop strings.

Detokenization follows vLLM's incremental scheme: decode the tokens from a prefix offset, and release
the new text only when it does not end in U+FFFD (a byte-level BPE token can end in the middle of a
UTF-8 character; the next token completes it). Tokens that ended the request (eos, a stop token id)
and ids past the tokenizer's vocabulary (a padded embedding) are not part of the text, as in vLLM
and OpenAI.

Stop strings end the text before the string (OpenAI leaves the stop sequence out); while streaming,
a tail that could still grow into a stop string is held back, so no client ever sees a stop string
or a piece of one.
"""
from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = (), hide_ids=()):
        self.tok = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.hide = set(hide_ids)
        self.V = tokenizer.vocab_size
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.text = ""  # decoded so far
        self.sent = 0  # characters handed out
        self.matched: str | None = None  # the stop string that ended the text

    def push(self, ids) -> str:
        """New text safe to send after these tokens."""
        self.ids += [t for t in ids if t not in self.hide and 0 <= t < self.V]
        self._decode(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text once the request has ended."""
        self._decode(final=True)
        return self._release(final=True)

    def _decode(self, final: bool) -> None:
        if self.read >= len(self.ids):
            return
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)

    def _release(self, final: bool) -> str:
        if self.matched is not None:
            return ""
        end = len(self.text)
        if self.stop:
            hits = [(i, s) for s in self.stop if (i := self.text.find(s, max(0, self.sent - len(s) + 1))) >= 0]
            if hits:
                end, self.matched = min(hits)
                self.text = self.text[:end]
            elif not final:
                end -= _held(self.text, self.stop)
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out


def _held(text: str, stops) -> int:
    """Length of the longest tail of text that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
