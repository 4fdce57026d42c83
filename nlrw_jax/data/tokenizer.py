"""Byte-level BPE tokenizer in the GPT-NeoX style (what Pythia uses), trained on our corpus.

Same pipeline as GPT-NeoX's tokenizer.json: NFC normalizer, ByteLevel pre-tokenizer with
add_prefix_space=False, BPE model, ByteLevel decoder. One special token, `<|endoftext|>`,
at id 0; as in GPT-NeoX it serves as BOS, EOS and pad.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from nlrw_jax.errors import UserError

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 0
MAX_VOCAB_SIZE = 8192


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = MAX_VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `texts`; the vocab has at most `vocab_size` entries."""
    # 256 byte symbols + the special token must fit, and the model's embedding is sized for <= 8192.
    if not 258 <= vocab_size <= MAX_VOCAB_SIZE:
        raise UserError(f"vocab_size must be in [258, {MAX_VOCAB_SIZE}], got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT_TOKEN],  # first special token gets id 0
        # All 256 bytes up front, so any input encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.token_to_id(EOT_TOKEN) != EOT_ID:  # guards the GPT-NeoX convention the model relies on
        raise RuntimeError(f"{EOT_TOKEN} got id {tok.token_to_id(EOT_TOKEN)}, expected {EOT_ID}")
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a tokenizer.json file or a directory that contains one."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise UserError(f"tokenizer not found: {p}")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON
        raise UserError(f"cannot read tokenizer {p}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
