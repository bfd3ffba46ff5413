"""ROUGE-L and exact match (SuperNI evaluation) against hand-worked examples."""

from __future__ import annotations

import pytest

from glora.metrics_generation import exact_match, generation_metrics, normalize_answer, rouge_l


def test_rouge_l_hand_worked_lcs() -> None:
    # reference "the cat sat on the mat" (6 tokens), prediction "the cat on mat" (4 tokens):
    # LCS = "the cat on mat" = 4 tokens -> P = 4/4 = 1, R = 4/6 = 2/3,
    # F = 2PR/(P+R) = (4/3)/(5/3) = 0.8.
    assert rouge_l("the cat on mat", "the cat sat on the mat") == pytest.approx(0.8)


def test_rouge_l_order_matters() -> None:
    # reference "a b c d" vs prediction "d c b a": every common subsequence has length 1
    # (the order is reversed) -> P = R = 1/4, F = 0.25.
    assert rouge_l("d c b a", "a b c d") == pytest.approx(0.25)


def test_rouge_l_uses_stemmer_and_lowercase() -> None:
    # Porter stems: prediction "Running dogs" -> [run, dog]; reference "the dog runs" ->
    # [the, dog, run]. LCS = 1 ("dog" or "run", not both in order) -> P = 1/2, R = 1/3,
    # F = 2·(1/6)/(5/6) = 0.4.
    assert rouge_l("Running dogs", "the dog runs") == pytest.approx(0.4)
    # Punctuation is a separator and case is ignored: identical token lists -> 1.
    assert rouge_l("Catherine.", "catherine") == pytest.approx(1.0)


def test_rouge_l_best_over_references() -> None:
    # vs "the cat sat on the mat": 0.8 (above); vs "a dog": LCS 0 -> 0; the best counts.
    assert rouge_l("the cat on mat", ["a dog", "the cat sat on the mat"]) == pytest.approx(0.8)
    assert rouge_l("the cat on mat", ["a dog"]) == 0.0


def test_rouge_l_empty() -> None:
    assert rouge_l("", "the cat") == 0.0
    with pytest.raises(ValueError, match="at least one reference"):
        rouge_l("x", [])


def test_normalize_answer() -> None:
    assert normalize_answer("  The  Cat, sat!") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theory") == "theory"  # "the" only as a whole word


def test_exact_match() -> None:
    assert exact_match("The Cat.", "cat") == 1.0
    assert exact_match("cats", "cat") == 0.0
    assert exact_match("POS", ["NEG", "pos"]) == 1.0  # best over references
    assert exact_match("a cat  sat", "cat sat!") == 1.0


def test_generation_metrics_mean() -> None:
    preds = ["the cat on mat", "POS", "nothing"]
    refs = [["the cat sat on the mat"], "POS", ["something", "else"]]
    m = generation_metrics(preds, refs)
    # ROUGE-L: (0.8 + 1 + 0) / 3; EM: (0 + 1 + 0) / 3.
    assert m == {"rougeL": pytest.approx(1.8 / 3), "em": pytest.approx(1 / 3)}
    with pytest.raises(ValueError, match="2 predictions but 1"):
        generation_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="zero examples"):
        generation_metrics([], [])
