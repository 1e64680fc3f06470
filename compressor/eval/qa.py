"""Scoring of generated short answers: SQuAD's exact match and token F1 (its official normalisation:
lower case, no punctuation, no articles, single spaces), the best over the reference answers.

Only the generated continuation is scored, never the prompt: with the passage in the prompt, a scorer
that saw an echo of it would find the answer there whatever the model generated.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def answer_span(generation: str) -> str:
    """The answer part of a generation: its first line (generation also stops there)."""
    return generation.strip().split("\n", 1)[0]


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    pred = normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        gold = normalize_answer(answer).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if not pred or not gold:
            best = max(best, float(pred == gold))
        elif common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def process_results(doc: dict[str, Any], results: Sequence[str]) -> dict[str, float]:
    """The harness hook of generation tasks: ``results[0]`` is the model's continuation of the prompt."""
    answer = answer_span(results[0])
    gold = list(doc["answers"]["text"])
    return {"exact_match": exact_match(answer, gold), "f1": token_f1(answer, gold)}
