"""A custom reward for `reward.model: examples.lexicon_reward:score`.

Any ``module:function`` that takes a list of texts (prompt + response) and returns
one float per text can be the reward. The module is imported from the project root,
so it runs your code: keep it in the repository and list it as a dependency of the
`train_reward` and `score` stages in dvc.yaml if you want DVC to rerun them when it
changes. It must be deterministic for the pipeline to be reproducible.
"""

from __future__ import annotations

import re

POSITIVE = frozenset("good great excellent love loved wonderful best fun enjoyable brilliant beautiful".split())
NEGATIVE = frozenset("bad worst awful boring terrible waste poor hate hated stupid dull".split())
_WORD = re.compile(r"[a-z']+")


def score(texts: list[str]) -> list[float]:
    """Positive minus negative lexicon words, per 10 words of text."""
    scores = []
    for text in texts:
        words = _WORD.findall(text.lower())
        hits = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
        scores.append(10.0 * hits / max(len(words), 1))
    return scores
