"""A deterministic custom reward (``module:function``) for tests: texts -> scores."""

POSITIVE = ("good", "great", "love", "best", "fun")


def keyword_score(texts: list[str]) -> list[float]:
    return [sum(t.lower().count(w) for w in POSITIVE) - 0.01 * len(t) for t in texts]
