"""Exact match and F1 of generated answers: SQuAD's normalisation, the generated answer only."""

import pytest

from compressor.eval.qa import answer_span, exact_match, normalize_answer, process_results, token_f1

DOC = {"answers": {"text": ["23 years", "23"]}}
PROMPT = "Title: Harvard\nBackground: Older than The Game by 23 years, the Regatta ...\nQuestion: By how many years?\nAnswer:"


def test_normalisation_drops_case_punctuation_articles_and_spaces():
    assert normalize_answer("  The  Sunset Blvd.! ") == "sunset blvd"
    assert exact_match("the Sunset blvd", ["Sunset Blvd."]) == 1.0
    assert exact_match("Sunset", ["Sunset Blvd."]) == 0.0


def test_f1_is_token_overlap_with_the_best_answer():
    assert token_f1("23 years ago", ["23 years", "1990"]) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert token_f1("nothing", ["23"]) == 0.0
    assert token_f1("", [""]) == 1.0


def test_only_the_generated_answer_is_scored():
    assert process_results(DOC, [" 23 years"]) == {"exact_match": 1.0, "f1": 1.0}
    assert process_results(DOC, [" 23\nQuestion: next one"]) == {"exact_match": 1.0, "f1": 1.0}
    # the prompt holds the answer: a generation that misses it scores 0, however it is echoed back
    assert process_results(DOC, [" I do not know"]) == {"exact_match": 0.0, "f1": 0.0}
    assert process_results(DOC, [PROMPT + " 23 years"])["exact_match"] == 0.0
    assert answer_span("  Paris\nrest") == "Paris"
