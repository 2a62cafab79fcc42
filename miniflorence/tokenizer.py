"""Florence-2's tokenizer: BART's byte-level BPE plus Florence-2's 1,024 added tokens.

Mirrors what `transformers.BartTokenizer.from_pretrained(...)` does on the Florence-2 files
(in transformers 5.x that is the Rust `tokenizers` pipeline: AddedVocabulary split,
ByteLevel pre-tokenizer, BPE model, RobertaProcessing, ByteLevel decoder), and GPT-2's
`encoder.py` (openai/gpt-2), where byte-level BPE comes from (Radford et al. 2019, sec. 2.2).

The pipeline, in the order `encode` runs it:
  1. added tokens (`<s>`, `<od>`, `<loc_17>`, ...) are cut out of the raw text first, the
     longest match at the leftmost position, exactly like HF's Aho-Corasick matcher;
  2. the text between them is split by GPT-2's pattern (words, numbers, punctuation runs,
     whitespace runs, English contractions);
  3. each piece becomes UTF-8 bytes, each byte a printable "byte character", and BPE merges
     adjacent symbols in merge-rank order until no ranked pair is left;
  4. `<s>` ... `</s>` go around the result (BART's single-sequence template).
"""

from __future__ import annotations

import json
import re
import sys
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

BOS, PAD, EOS, UNK, MASK = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
# The real Florence-2 tokenizer files (MIT), shipped as package data: miniflorence/assets/ATTRIBUTION.md.
DEFAULT_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer"
# transformers' `clean_up_tokenization`, applied in this order.
CLEAN_UP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


@dataclass(frozen=True)
class AddedToken:
    """A token matched verbatim before BPE. `lstrip` swallows whitespace to its left
    (BART's `<mask>`), `rstrip` to its right; `special` tokens go with skip_special_tokens."""

    content: str
    id: int
    lstrip: bool = False
    rstrip: bool = False
    special: bool = True


# --- bytes <-> printable characters (GPT-2 encoder.py, `bytes_to_unicode`) ---------------


@cache
def bytes_to_unicode() -> dict[int, str]:
    """Map the 256 byte values to printable characters, so BPE never sees whitespace or
    control characters: printable Latin-1 bytes map to themselves, the other 68 bytes to
    U+0100 onwards, in byte order (so a space, byte 32, becomes 'Ġ' = U+0120)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# --- GPT-2 pre-tokenisation without the `regex` module --------------------------------
# The pattern is  's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# Python's `re` has no \p{..}, and its \s differs from Oniguruma's (HF's regex engine):
# Python counts U+001C..U+001F as whitespace, Oniguruma does not. So the three classes are
# spelled out from `unicodedata`: L = categories L*, N = categories N*, S = Oniguruma's \s,
# i.e. U+0009..U+000D, U+0085 and categories Zs, Zl, Zp (the Unicode White_Space set).
# The categories come from this Python's Unicode tables (14.0 for Python 3.11); a character
# assigned only in a later Unicode version, which HF's engine may already know as a letter,
# can split differently. Every assigned character splits identically (tested).

# Nothing beyond plane 3 is a letter or a number (planes 4-13 are unassigned, 14 holds tags
# and variation selectors, 15-16 private use), so the scan stops there.
_LAST_SCANNED = 0x3FFFF


def _class_ranges(accept: Callable[[str], bool]) -> str:
    """A `re` character-class body ('a-zà-ö...') for the code points `accept` admits."""
    parts, start = [], None
    for cp in range(_LAST_SCANNED + 2):
        inside = cp <= _LAST_SCANNED and accept(chr(cp))
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            first, last = re.escape(chr(start)), re.escape(chr(cp - 1))
            parts.append(first if start == cp - 1 else f"{first}-{last}")
            start = None
    return "".join(parts)


def _is_space(ch: str) -> bool:
    return "\t" <= ch <= "\r" or ch == "\x85" or unicodedata.category(ch) in ("Zs", "Zl", "Zp")


@cache
def gpt2_pattern() -> re.Pattern:
    """GPT-2's pre-tokenisation pattern, compiled once (scanning the classes takes ~0.3 s)."""
    L = _class_ranges(lambda ch: unicodedata.category(ch)[0] == "L")
    N = _class_ranges(lambda ch: unicodedata.category(ch)[0] == "N")
    S = _class_ranges(_is_space)
    return re.compile(
        rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+"
    )


# --- checking tokenizer files ----------------------------------------------------------


def read_json(file: Path, kind: type) -> Any:
    """The JSON value in `file`, which must be of type `kind`; a ValueError naming the file otherwise."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(value, kind):
        raise ValueError(f"{file}: expected a JSON {'object' if kind is dict else kind.__name__}, "  # noqa: TRY004
                         f"got {type(value).__name__}")
    return value


def check_byte_level_bpe(vocab: Any, merges: list[tuple[str, ...]], where: str) -> None:
    """Refuse files that are not a byte-level BPE (GPT-2 / BART family) tokenizer: every byte symbol
    in the vocabulary, every merge a pair whose parts and result are tokens (HF's BPE refuses the
    same). Catches a wrong folder before it fails, or silently mis-tokenizes, on some text."""
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
        raise ValueError(f"{where}: the vocabulary must map token strings to integer ids")
    missing = [ch for ch in bytes_to_unicode().values() if ch not in vocab]
    if missing:
        raise ValueError(f"{where}: not a byte-level BPE tokenizer ({len(missing)} of the 256 byte symbols are "
                         "missing from the vocabulary); Florence-2 uses BART's tokenizer")
    for merge in merges:
        if len(merge) != 2 or any(part not in vocab for part in (*merge, "".join(merge))):
            raise ValueError(f"{where}: merge {' '.join(merge)!r} is not a pair of vocabulary tokens "
                             "whose join is a token")


# --- the tokenizer ----------------------------------------------------------------------


class Tokenizer:
    """Byte-level BPE tokenizer with HF `BartTokenizer` behaviour (identical ids).

    Args:
        vocab: token string -> id (`vocab.json`).
        merges: BPE merges in rank order, each a pair of symbols (`merges.txt`).
        added_tokens: tokens matched verbatim before BPE (specials and Florence-2's 1,024).
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], added_tokens: list[AddedToken]) -> None:
        self.encoder = dict(vocab)
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.added = {tok.content: tok for tok in added_tokens}
        for tok in added_tokens:  # an added token wins over a vocab entry with its id
            self.encoder[tok.content] = tok.id
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        # Python's `re` tries alternatives left to right, so longest-first = leftmost-longest.
        contents = sorted(self.added, key=len, reverse=True)
        self.added_pattern = re.compile("|".join(map(re.escape, contents))) if contents else None
        self.cache: dict[str, list[int]] = {}
        for name in (BOS, PAD, EOS, UNK):
            if name not in self.encoder:
                raise ValueError(f"the vocabulary has no {name!r} token")
        self.bos_token_id, self.pad_token_id = self.encoder[BOS], self.encoder[PAD]
        self.eos_token_id, self.unk_token_id = self.encoder[EOS], self.encoder[UNK]

    # -- loading --------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `vocab.json` + `merges.txt` + `added_tokens.json` (whitespace flags from
        `tokenizer_config.json` when present), or a single `tokenizer.json`."""
        path = Path(path)
        if path.is_file():
            raise NotADirectoryError(f"tokenizer directory {path} is a file: give the folder that holds "
                                     "vocab.json, merges.txt and added_tokens.json (or tokenizer.json)")
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory {path} does not exist")
        if (path / "tokenizer.json").is_file():
            return cls.from_tokenizer_json(path / "tokenizer.json")
        for name in ("vocab.json", "merges.txt", "added_tokens.json"):
            if not (path / name).is_file():
                raise FileNotFoundError(
                    f"{path} has no {name}: a Florence-2 tokenizer needs vocab.json, merges.txt "
                    "and added_tokens.json (or a single tokenizer.json)"
                )
        vocab = read_json(path / "vocab.json", dict)
        try:
            lines = (path / "merges.txt").read_text(encoding="utf-8").split("\n")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path / 'merges.txt'}: not UTF-8 text ({e.reason})") from None
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        check_byte_level_bpe(vocab, merges, str(path))
        flags = {}  # content -> its entry in tokenizer_config's `added_tokens_decoder`
        if (path / "tokenizer_config.json").is_file():
            config = read_json(path / "tokenizer_config.json", dict)
            entries = config.get("added_tokens_decoder", {})
            well_formed = isinstance(entries, dict) and all(
                isinstance(v, dict) and "content" in v for v in entries.values()
            )
            if not well_formed:
                raise ValueError(f"{path / 'tokenizer_config.json'}: added_tokens_decoder is not a table of tokens")
            flags = {v["content"]: v for v in entries.values()}
        # BART's special tokens; `<mask>` swallows the space before it (BartTokenizer's default).
        extra = read_json(path / "added_tokens.json", dict)
        if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in extra.items()):
            raise ValueError(f"{path / 'added_tokens.json'}: must map token strings to integer ids")
        ids = {**vocab, **extra}
        defaults = {name: {"lstrip": name == MASK} for name in (BOS, PAD, EOS, UNK, MASK) if name in vocab}
        defaults.update({name: {} for name in extra})
        tokens = []
        for content, default in defaults.items():
            entry = flags.get(content, default)
            tokens.append(AddedToken(content, ids[content], entry.get("lstrip", False),
                                     entry.get("rstrip", False), entry.get("special", True)))
        try:
            return cls(vocab, merges, tokens)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_tokenizer_json(cls, file: str | Path) -> Tokenizer:
        """Load an HF `tokenizer.json` (BPE model, ByteLevel pre-tokenizer)."""
        spec = read_json(Path(file), dict)
        model = spec.get("model")
        if not isinstance(model, dict) or model.get("type") != "BPE":
            got = model.get("type") if isinstance(model, dict) else model
            raise ValueError(f"{file}: expected a BPE model, got {got!r}")
        try:
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            tokens = [AddedToken(t["content"], t["id"], t.get("lstrip", False), t.get("rstrip", False),
                                 t.get("special", False)) for t in spec.get("added_tokens", [])]
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{file}: its model or added tokens are malformed ({type(e).__name__}: {e})") from None
        check_byte_level_bpe(model.get("vocab"), merges, str(file))
        try:
            return cls(model["vocab"], merges, tokens)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None

    # -- sizes and lookups ----------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """All tokens, added ones included (51,289 for Florence-2; HF calls this `len(tok)`)."""
        return len(self.decoder)

    def __len__(self) -> int:
        return self.vocab_size

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        """Token strings -> ids; an unknown token gives the `<unk>` id, as in HF."""
        if isinstance(tokens, str):
            return self.encoder.get(tokens, self.unk_token_id)
        return [self.encoder.get(t, self.unk_token_id) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | list[str]:
        """Ids -> token strings (byte characters, e.g. 'Ġcar'); an unknown id is an error."""
        if isinstance(ids, int):
            return self.decoder[ids]
        return [self.decoder[int(i)] for i in ids]

    # -- encoding -------------------------------------------------------------------------

    def split_added_tokens(self, text: str) -> list[str | AddedToken]:
        """Cut the added tokens out of `text`: plain-text pieces stay strings."""
        if self.added_pattern is None:
            return [text] if text else []
        pieces: list[str | AddedToken] = []
        start = 0  # end of the last piece taken
        for match in self.added_pattern.finditer(text):
            token = self.added[match.group()]
            left, right = match.start(), match.end()
            if token.lstrip:  # swallow whitespace on the left, but not into the last token
                while left > start and _is_space(text[left - 1]):
                    left -= 1
            if token.rstrip:
                while right < len(text) and _is_space(text[right]):
                    right += 1
            if left > start:
                pieces.append(text[start:left])
            pieces.append(token)
            start = right
        if start < len(text):
            pieces.append(text[start:])
        return pieces

    def bpe(self, word: str) -> list[int]:
        """Merge the byte characters of one pre-token, lowest merge rank first."""
        if word in self.cache:
            return self.cache[word]
        symbols = list(word)
        while len(symbols) > 1:
            pairs = set(pairwise(symbols))
            best = min(pairs, key=lambda p: self.ranks.get(p, sys.maxsize))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = [self.encoder[s] for s in symbols]
        if len(self.cache) < 100_000:
            self.cache[word] = ids
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> token ids, `[<s>] + ids + [</s>]` when `add_special_tokens` (BART)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = [self.bos_token_id] if add_special_tokens else []
        for piece in self.split_added_tokens(text):
            if isinstance(piece, AddedToken):
                ids.append(piece.id)
                continue
            for word in gpt2_pattern().findall(piece):
                ids.extend(self.bpe("".join(self.byte_encoder[b] for b in word.encode("utf-8"))))
        if add_special_tokens:
            ids.append(self.eos_token_id)
        return ids

    def __call__(self, texts: str | list[str], add_special_tokens: bool = True) -> dict[str, torch.Tensor]:
        """A batch, right-padded with `<pad>` (id 1): {"input_ids", "attention_mask"} as
        int64 tensors of shape (B, T), the mask 1 on real tokens and 0 on padding."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("no texts to encode")
        rows = [self.encode(t, add_special_tokens) for t in texts]
        T = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), T), self.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
        for b, row in enumerate(rows):
            input_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[b, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # -- decoding -------------------------------------------------------------------------

    def token_bytes(self, token: str) -> bytes:
        """The bytes a token stands for (the ByteLevel decoder's rule: map every character
        back through the byte table, or, if one has no byte, take the UTF-8 of the text)."""
        try:
            return bytes(self.byte_decoder[c] for c in token)
        except KeyError:
            return token.encode("utf-8")

    def decode(
        self,
        ids: list[int] | torch.Tensor,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool = False,
    ) -> str:
        """Token ids -> text. Special tokens appear verbatim unless skipped; invalid UTF-8
        becomes U+FFFD. `clean_up_tokenization_spaces` removes the space before . ? ! , and
        English contractions: transformers 4.x did this (the Florence-2 config asks for it),
        transformers 5.x skips it for BPE tokenizers, so the default is off."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        unknown = [i for i in ids if int(i) not in self.decoder]
        if unknown:
            raise ValueError(f"token ids {unknown[:5]} are outside the vocabulary (0..{self.vocab_size - 1})")
        tokens = [self.decoder[int(i)] for i in ids]
        if skip_special_tokens:
            tokens = [t for t in tokens if not (t in self.added and self.added[t].special)]
        text = b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")
        if clean_up_tokenization_spaces:
            for before, after in CLEAN_UP:
                text = text.replace(before, after)
        return text

    def batch_decode(
        self, sequences: list[list[int]] | torch.Tensor, skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool = False,
    ) -> list[str]:
        """`decode` for each row."""
        return [self.decode(ids, skip_special_tokens, clean_up_tokenization_spaces) for ids in sequences]
