"""The short answer: one sentence, at most :data:`MAX_ANSWER` characters, with each pair's headline number.

``dsn-robust run`` and ``dsn-robust compare`` end with it (printed once, on stdout); the long form, every pair's
test, sample count, band and curves, stays in the comparison page and its ``summary.json``. Example::

    dsn(hard) vs dual: minimal distance x0.48 [0.35, 0.68], less robust; vs dsn(open): x0.97 [0.93, 1.02], no
    practical difference (one training seed)

When it does not fit, an inconclusive or not-comparable pair's reason goes first, then the intervals (the page has
both), then pairs are cut with a pointer to the page: the sentence never grows past the bound.
"""
from __future__ import annotations

from typing import Sequence

from robustness.analysis.verdict import PairVerdict

#: The longest answer line, in characters.
MAX_ANSWER = 200

#: What each verdict kind says in the short answer.
SHORT_FINDING = {"more": "more robust", "less": "less robust", "equivalent": "no practical difference",
                 "none": "no evidence of a difference", "inconclusive": "inconclusive", "confounded": "confounded",
                 "not-comparable": "not comparable"}


def _number(v: PairVerdict, interval: bool) -> str:
    e = v.effect
    if e is None:
        return ""
    if e.scale == "ratio":
        core = f"x{e.estimate:.2f}" + (f" [{e.low:.2f}, {e.high:.2f}]" if interval else "")
        return "minimal distance " + core
    core = f"{100 * e.estimate:+.1f} pts" + (f" [{100 * e.low:+.1f}, {100 * e.high:+.1f}]" if interval else "")
    return "robust acc " + core


def _clause(v: PairVerdict, first: bool, interval: bool, reason: bool = True) -> str:
    head = f"{v.a} vs {v.b}" if first else f"vs {v.b}"
    # a pair that is no answer shows no number: a ratio beside "not comparable" reads as a result
    number = "" if v.kind in ("not-comparable", "confounded") else _number(v, interval)
    if not first and number.startswith("minimal distance "):
        number = number[len("minimal distance "):]  # said once, in the first clause
    finding = SHORT_FINDING.get(v.kind, v.kind)
    if reason and v.reason and v.kind in ("inconclusive", "not-comparable"):
        finding += f": {v.reason}"
    return f"{head}: " + ", ".join(part for part in (number, finding) if part)


def short_answer(verdicts: Sequence[PairVerdict], fallback: str = "") -> str:
    """The answer sentence for ``verdicts`` (the skipping side against each static one), at most
    :data:`MAX_ANSWER` characters; ``fallback`` (cut to the bound) when there is no pair."""
    if not verdicts:
        return _cut(fallback)
    scope = verdicts[0].scope.split(":")[0]  # "one training seed", "3 training seeds", ...
    # what goes first when it does not fit: an inconclusive pair's reason, then the intervals (the page has both)
    for interval, reason in ((True, True), (True, False), (False, False)):
        text = "; ".join(_clause(v, k == 0, interval, reason) for k, v in enumerate(verdicts))
        for candidate in (f"{text} ({scope})", text):
            if len(candidate) <= MAX_ANSWER:
                return candidate
    return _cut(text)


def _cut(text: str) -> str:
    more = " … (see the comparison page)"
    return text if len(text) <= MAX_ANSWER else text[:MAX_ANSWER - len(more)].rstrip(" ;,") + more
