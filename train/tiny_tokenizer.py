"""A small byte-level BPE tokenizer made from a handful of texts, in the Florence-2 file format.

For demos and tests that want a vocabulary made for their own few texts (a handful of tokens per
answer learns in seconds; the real Florence-2 tokenizer is miniflorence/assets/tokenizer). The vocabulary is
BART's four special tokens at BART's ids (`<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3), the 256 byte
symbols (so any text can be encoded and decoded exactly), and one merge chain per distinct word of
the given texts, so that those words become few tokens; optional added tokens (e.g. Florence-2's
`<loc_0>`..`<loc_999>`, for detection) follow them, matched verbatim and special as in the real
tokenizer. `miniflorence.Tokenizer.from_dir` reads the folder it writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from miniflorence.tokenizer import Tokenizer, bytes_to_unicode, gpt2_pattern

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")


def write_tiny_tokenizer(texts: Iterable[str], folder: str | Path, added_tokens: Iterable[str] = ()) -> Tokenizer:
    """Write vocab.json, merges.txt and added_tokens.json under `folder`; return the tokenizer."""
    byte_symbols = bytes_to_unicode()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab[byte_symbols[b]] = len(vocab)
    words = sorted({"".join(byte_symbols[b] for b in word.encode("utf-8"))
                    for text in texts for word in gpt2_pattern().findall(text)})
    merges: list[tuple[str, str]] = []
    for word in words:  # merge left to right: (w0, w1) -> w0w1, (w0w1, w2) -> w0w1w2, ...
        current = word[0]
        for symbol in word[1:]:
            if current + symbol not in vocab:
                vocab[current + symbol] = len(vocab)
                merges.append((current, symbol))
            current += symbol
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    added = {token: len(vocab) + i for i, token in enumerate(dict.fromkeys(added_tokens))}
    (folder / "added_tokens.json").write_text(json.dumps(added), encoding="utf-8")
    return Tokenizer.from_dir(folder)
