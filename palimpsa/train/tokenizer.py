"""Tokenizers for training: any Hugging Face tokenizer, or an offline byte-level one that needs no download.

The byte-level tokenizer is a real ``PreTrainedTokenizerFast`` (it saves, loads and works in lm-eval like
any other): token id ``b`` is the UTF-8 byte ``b`` (0..255) and id 256 is ``<|endoftext|>`` (eos and pad).
"""

from __future__ import annotations

import os

BYTE_TOKENIZER_NAME = "byte"
BYTE_EOS_TOKEN = "<|endoftext|>"
BYTE_EOS_ID = 256


def byte_level_tokenizer():
    """A 257-token byte-level ``PreTrainedTokenizerFast``: id = UTF-8 byte value, 256 = eos/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # ByteLevel pre-tokenisation maps each byte to a printable character (GPT-2's table); giving the
    # character of byte b the id b and no merges makes the BPE model a plain byte tokenizer.
    byte_to_char = bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=BYTE_EOS_TOKEN, pad_token=BYTE_EOS_TOKEN,
        model_max_length=1 << 30,
    )
    assert tokenizer.eos_token_id == BYTE_EOS_ID
    return tokenizer


def load_tokenizer(name: str):
    """``"byte"`` for the offline byte-level tokenizer, else a local directory or hub id for ``AutoTokenizer``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"tokenizer must be 'byte', a local directory or a hub id, got {name!r}")
    if name == BYTE_TOKENIZER_NAME:
        return byte_level_tokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as err:
        where = "local directory" if os.path.isdir(name) else "hub id (needs network or the local HF cache)"
        raise ValueError(f"tokenizer {name!r} could not be loaded as a {where}: {err}") from err


def is_byte_level(tokenizer) -> bool:
    """True for the tokenizer made by :func:`byte_level_tokenizer` (so bytes can be encoded directly)."""
    return (
        len(tokenizer) == BYTE_EOS_ID + 1
        and tokenizer.eos_token == BYTE_EOS_TOKEN
        and tokenizer.convert_tokens_to_ids("Ġ") == ord(" ")
    )
