"""mellum2.tokenizer: Mellum 2's byte-level BPE (training, special tokens, the `Tokenizer` class).

`from mellum2.tokenizer import Tokenizer, train_bpe, SPECIAL_TOKENS`; `mellum2 tokenizer --help`.
"""
from .special import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, SpecialToken, special_ids
from .tokenizer import Tokenizer, TokenizerError
from .bpe import bytes_per_token, train_bpe

__all__ = ["Tokenizer", "TokenizerError", "train_bpe", "bytes_per_token", "SPECIAL_TOKENS", "SpecialToken",
           "special_ids", "BOS_ID", "EOS_ID", "PAD_ID"]
