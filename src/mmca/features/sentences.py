"""What makes a string a sentence the text encoder can read: Unicode text that encodes as
UTF-8 (no lone surrogates, which the tokenizer cannot take), with at least one token besides
the encoder's special ones. A string of control, format (zero-width) or space characters
only tokenizes to [CLS] [SEP]: searched, it would match every image by nothing."""

from __future__ import annotations

from typing import Any, Sequence


def is_unicode_text(text: str) -> bool:
    """False for a str holding lone surrogates (from JSON escapes or undecodable argv bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def wordless(ids: Sequence[Sequence[int]], tokenizer: Any) -> list[int]:
    """Positions of the tokenized sentences that hold nothing but special tokens."""
    special = set(tokenizer.all_special_ids)
    return [j for j, row in enumerate(ids) if all(t in special for t in row)]
