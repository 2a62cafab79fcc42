"""Edit distance and the answer scores of document VQA.

- `similarity`: 1 - distance / max(len), the "Levenshtein similarity" the public Florence-2
  DocVQA fine-tuning tutorial reports (0 for nothing in common, 1 for equal strings).
- `anls`: Average Normalized Levenshtein Similarity (Biten et al., "Scene Text Visual Question
  Answering", ICCV 2019, Sec. 4; the DocVQA metric): compare lower-cased, stripped strings, take
  the best over the accepted answers, and score 0 when the normalised distance is not below the
  threshold 0.5 (similarity 0.5 or less), so that an answer which is merely close earns nothing.
- `exact_match`: the same normalisation, equal to one of the accepted answers.
"""

from __future__ import annotations

from collections.abc import Sequence


def distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions turning a into b."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))  # distances from a[:0] to every prefix of b
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def similarity(a: str, b: str) -> float:
    """1 - distance / max(len(a), len(b)); two empty strings are equal (1.0)."""
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else 1.0 - distance(a, b) / longest


def normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """The best normalised similarity to any accepted answer, or 0 when its normalised distance
    (1 - similarity) is `threshold` or more, as in the DocVQA evaluation."""
    best = max(similarity(normalize(prediction), normalize(a)) for a in answers)
    return best if 1.0 - best < threshold else 0.0


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    return float(any(normalize(prediction) == normalize(a) for a in answers))
