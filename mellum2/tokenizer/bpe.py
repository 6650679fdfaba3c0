"""Train Mellum 2's byte-level BPE with Hugging Face `tokenizers`.

What the report fixes (docs/mellum2.md §2): byte-level BPE, digits split individually before BPE,
a 98,304 vocabulary with the special tokens of `special.py`. What we chose where it is silent:

- Pre-tokenisation is the GPT-4 (cl100k) split with `\\p{N}{1,3}` narrowed to `\\p{N}`, so every digit
  is its own pre-token and numbers never merge (as in Llama/DeepSeek-Coder tokenizers). Runs of
  whitespace stay one pre-token (`\\s+(?!\\S)`), so code indentation (4, 8, 12 spaces, tabs) becomes
  single learned tokens and a line break plus its indentation costs two tokens, not one per space.
- No normaliser: decoding is byte-exact for any text (no NFC, no stripping, no prefix space).
- The 256 byte symbols are the initial alphabet, so nothing is ever unknown; ids 0..32 are the special
  tokens in table order, merges start at 33 + 256.

`train_bpe` returns a `Tokenizer` (tokenizer.py); `bytes_per_token` is the compression figure the CLI
and `mellum2 data prepare` report on held-out text.
"""
from __future__ import annotations

import json
from typing import Iterable, Iterator

from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .special import NUM_SPECIAL, SPECIAL_TOKENS
from .tokenizer import Tokenizer

# cl100k's pattern with single digits; \s*[\r\n]+ keeps blank lines + newline together.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)
MIN_VOCAB = NUM_SPECIAL + 256  # specials + the byte alphabet, before any merge


def new_hf_tokenizer() -> HFTokenizer:
    """An untrained byte-level BPE with Mellum 2's pre-tokeniser and decoder (no normaliser)."""
    tok = HFTokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
              show_progress: bool = False, length: int | None = None) -> Tokenizer:
    """Train on `texts` (any iterable of documents) to `vocab_size` entries including the specials.

    The result has exactly `vocab_size` entries when the corpus has enough distinct merges, fewer
    otherwise (a tiny corpus cannot fill 98,304)."""
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise ValueError(f"train_bpe: vocab_size must be an int >= {MIN_VOCAB} "
                         f"({NUM_SPECIAL} specials + 256 bytes), got {vocab_size!r}")
    tok = new_hf_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
        special_tokens=[t.content for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    n_seen = 0

    def counted() -> Iterator[str]:
        nonlocal n_seen
        for text in texts:
            if text:
                n_seen += 1
                yield text

    tok.train_from_iterator(counted(), trainer=trainer, length=length)
    if n_seen == 0:
        raise ValueError("train_bpe: no non-empty training text was given")
    return Tokenizer(_with_special_flags(tok))


def _with_special_flags(tok: HFTokenizer) -> HFTokenizer:
    """The trainer marks every special token special=True; think/tool tokens must be special=False."""
    spec = json.loads(tok.to_str())
    flags = {t.content: t.special for t in SPECIAL_TOKENS}
    for entry in spec["added_tokens"]:
        if entry["content"] in flags:
            entry["special"] = flags[entry["content"]]
            entry["normalized"] = False
    return HFTokenizer.from_str(json.dumps(spec))


def bytes_per_token(tok: Tokenizer, texts: Iterable[str]) -> float:
    """UTF-8 bytes per token over `texts` (higher is better compression); 0.0 for no tokens."""
    texts = [t for t in texts if t]
    if not texts:
        return 0.0
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tok = sum(len(ids) for ids in tok.encode_batch(texts, allow_special=False))
    return n_bytes / max(n_tok, 1)
