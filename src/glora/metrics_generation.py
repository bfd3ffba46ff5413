"""Generation metrics (SuperNI): ROUGE-L and exact match, best over all references.

These follow the official Super-NaturalInstructions evaluation (``compute_metrics.py`` of
``allenai/natural-instructions``) for English tasks:

* **ROUGE-L** is the F-measure of Google's ``rouge-score`` package with
  ``RougeScorer(["rougeL"], use_stemmer=True)`` (its default tokenizer: lower-case, every
  non-alphanumeric character is a separator, Porter stemming), i.e. F = 2PR/(P+R) with
  P = LCS/|prediction| and R = LCS/|reference| in tokens.
* **Exact match** compares :func:`normalize_answer` of the prediction and the reference
  (lower-case, punctuation removed, the articles a/an/the removed, whitespace collapsed).
* For every example, the score is the **maximum over its references**, then averaged over the
  examples.

Unlike the official script (which reports percentages), the scores here are fractions in
[0, 1], like the GLUE metrics of :mod:`glora.metrics`.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

__all__ = [
    "exact_match",
    "generation_metrics",
    "normalize_answer",
    "rouge_l",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD/SuperNI answer normalisation: lower-case, drop punctuation and articles, squash spaces.

    >>> normalize_answer("  The  Cat, sat!")
    'cat sat'
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


@lru_cache(maxsize=1)
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _as_references(references: str | Sequence[str]) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("an example needs at least one reference")
    if not all(isinstance(r, str) for r in refs):
        raise TypeError(f"references must be strings, got {refs!r}")
    return refs


def _best(
    score: Callable[[str, str], float], prediction: str, references: str | Sequence[str]
) -> float:
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a string, got {type(prediction).__name__}")
    return max(score(prediction, ref) for ref in _as_references(references))


def _rouge_l_one(prediction: str, reference: str) -> float:
    return float(_scorer().score(target=reference, prediction=prediction)["rougeL"].fmeasure)


def _exact_match_one(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """ROUGE-L F-measure of ``prediction``, best over ``references`` (one string or several).

    An empty prediction or reference (no alphanumeric token) scores 0.
    """
    return _best(_rouge_l_one, prediction, references)


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 if the normalised ``prediction`` equals a normalised reference, else 0.0."""
    return _best(_exact_match_one, prediction, references)


def generation_metrics(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]]
) -> dict[str, float]:
    """Mean ROUGE-L and exact match of ``predictions`` against their ``references``.

    Args:
        predictions: one generated string per example.
        references: per example, a reference string or a list of references (the best one
            counts).

    Returns:
        ``{"rougeL": ..., "em": ...}``, fractions in [0, 1].

    Raises:
        ValueError: different lengths, no examples, or an example without references.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("cannot compute metrics on zero examples")
    n = len(predictions)
    rouge = sum(rouge_l(p, r) for p, r in zip(predictions, references)) / n
    em = sum(exact_match(p, r) for p, r in zip(predictions, references)) / n
    return {"rougeL": rouge, "em": em}
