"""`Tokenizer`: Mellum 2's byte-level BPE behind a small API, saved in the Hugging Face format.

A thin wrapper over a `tokenizers.Tokenizer` (the same Rust engine `transformers` runs), so
`transformers.AutoTokenizer.from_pretrained(dir)` on a saved directory encodes identically (tested).

Special tokens in text. `encode(text)` maps the *strings* of special tokens (`<|im_end|>`,
`<fim_prefix>`, ...) to their single ids, like `transformers` does; chat templates and FIM prompts
rely on that. Raw corpus text must not be able to inject control tokens (the Python standard library
itself contains the string `<|endoftext|>`), so the data pipeline calls `encode(text,
allow_special=False)`, which encodes those strings as ordinary bytes. Nothing is ever added
implicitly: no bos/eos, no prefix space. `decode(encode(t)) == t` for every str `t` (either mode).

Every saved directory carries the chat template (mellum2/chat/template.jinja), so transformers'
`apply_chat_template` on it renders what `mellum2.chat.render` renders.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer as HFTokenizer

from mellum2 import atomic
from mellum2.chat.template import TEMPLATE as CHAT_TEMPLATE
from mellum2.errors import MellumError

from .special import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, special_ids

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # what transformers >= 4.43 reads first
_IDS = special_ids()


class TokenizerError(MellumError, ValueError):
    """A missing or malformed tokenizer directory/file; the message names the path and what is wrong."""


class Tokenizer:
    """Byte-level BPE with Mellum 2's special tokens at fixed ids (see special.py)."""

    bos_id = BOS_ID  # <|endoftext|>
    eos_id = EOS_ID  # <|im_end|>
    pad_id = PAD_ID  # <fim_pad>
    eot_id = _IDS["eot"]
    fim_prefix_id = _IDS["fim_prefix"]
    fim_middle_id = _IDS["fim_middle"]
    fim_suffix_id = _IDS["fim_suffix"]
    fim_pad_id = _IDS["fim_pad"]
    file_sep_id = _IDS["file_sep"]
    reponame_id = _IDS["reponame"]
    im_start_id = _IDS["im_start"]
    im_end_id = _IDS["im_end"]
    think_id = _IDS["think"]
    think_end_id = _IDS["think_end"]
    tool_call_id = _IDS["tool_call"]
    tool_call_end_id = _IDS["tool_call_end"]
    tool_response_id = _IDS["tool_response"]
    tool_response_end_id = _IDS["tool_response_end"]

    def __init__(self, hf: HFTokenizer, source: str = "<memory>"):
        self.hf = hf
        self.source = source
        for t in SPECIAL_TOKENS:
            got = hf.token_to_id(t.content)
            if got != t.id:
                raise TokenizerError(f"{source}: special token {t.content!r} must have id {t.id}, found {got}")
        spec = json.loads(hf.to_str())
        spec["added_tokens"] = []  # same vocabulary and merges, but special strings are plain text
        self._plain = HFTokenizer.from_str(json.dumps(spec))

    # ------------------------------------------------------------------ io
    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load `path/tokenizer.json` (or a tokenizer.json file given directly)."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"{file}: no tokenizer file (expected a directory holding {TOKENIZER_FILE})")
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise TokenizerError(f"{file}: not a valid tokenizers JSON file ({e})") from None
        return cls(hf, source=str(file))

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json + tokenizer_config.json + chat_template.jinja (what transformers'
        AutoTokenizer reads). The chat template is mellum2/chat/template.jinja, also stored under the
        config's `chat_template` key for readers that only know that place."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path / TOKENIZER_FILE, self.hf.to_str(pretty=True))
        atomic.write_text(path / CHAT_TEMPLATE_FILE, CHAT_TEMPLATE)
        atomic.write_text(path / CONFIG_FILE, json.dumps(self.hf_config(), indent=2, ensure_ascii=False))
        return path

    def hf_config(self) -> dict:
        """tokenizer_config.json: generic fast tokenizer, no implicit bos/eos, no space clean-up,
        Mellum 2's chat template."""
        by_id = {t.id: t for t in SPECIAL_TOKENS}
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": by_id[self.bos_id].content,
            "eos_token": by_id[self.eos_id].content,
            "pad_token": by_id[self.pad_id].content,
            "unk_token": None,
            "add_bos_token": False,
            "add_eos_token": False,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 131072,
            "chat_template": CHAT_TEMPLATE,
            "added_tokens_decoder": {
                str(t.id): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": t.special}
                for t in SPECIAL_TOKENS
            },
        }

    # ------------------------------------------------------------------ encode / decode
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> dict[str, int]:
        """name -> id, e.g. {'eot': 0, 'fim_prefix': 1, ..., 'im_end': 28, 'tool_response_end': 32}."""
        return dict(_IDS)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings become their ids unless allow_special=False."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode: expected str, got {type(text).__name__}")
        tok = self.hf if allow_special else self._plain
        return tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], allow_special: bool = True) -> list[list[int]]:
        """encode() over many texts, in parallel on all cores (the Rust engine's thread pool)."""
        tok = self.hf if allow_special else self._plain
        # encode_batch_fast skips character offsets, which we never use (about 2x faster)
        fn = getattr(tok, "encode_batch_fast", tok.encode_batch)
        return [e.ids for e in fn(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; byte sequences that are not valid UTF-8 decode to U+FFFD."""
        ids = [int(i) for i in ids]
        V = self.vocab_size
        if ids and (min(ids) < 0 or max(ids) >= V):
            bad = [i for i in ids if not 0 <= i < V]
            raise ValueError(f"Tokenizer.decode: ids {bad[:5]} outside [0, {V})")
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(int(i))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, source={self.source!r})"

