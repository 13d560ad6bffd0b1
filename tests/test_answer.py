"""The short answer: one sentence with each pair's number, bounded in length whatever the labels."""
from __future__ import annotations

from robustness.findings.answer import MAX_ANSWER, short_answer
from robustness.analysis.verdict import Effect, PairVerdict, seeds_scope


def _pair(b: str, kind: str, est: float, lo: float, hi: float, a: str = "dsn(hard)", scale: str = "ratio",
          scope: str = seeds_scope(1)) -> PairVerdict:
    return PairVerdict(a, b, kind, effect=Effect("median distance ratio", est, lo, hi, scale), scope=scope)


def test_the_answer_names_each_pair_with_its_number_and_interval():
    text = short_answer([_pair("dual", "less", 0.48, 0.35, 0.68), _pair("dsn(open)", "equivalent", 0.97, 0.93, 1.02)])
    assert text == ("dsn(hard) vs dual: minimal distance x0.48 [0.35, 0.68], less robust; vs dsn(open): x0.97 "
                    "[0.93, 1.02], no practical difference (one training seed)")
    pooled = short_answer([_pair("dual", "none", 1.04, 0.94, 1.13, scope=seeds_scope(3))])
    assert pooled.endswith("no evidence of a difference (3 training seeds)")


def test_the_answer_stays_within_its_bound_whatever_the_labels():
    long = [_pair("x" * 60 + str(k), "more", 1.3, 1.1, 1.5, a="y" * 60) for k in range(4)]
    text = short_answer(long)
    assert len(text) <= MAX_ANSWER and text.endswith("(see the comparison page)")
    # when the intervals are what does not fit, they go first and the findings stay
    medium = [_pair("static-twin-" + str(k), "less", 0.9, 0.85, 0.95) for k in range(4)]
    text = short_answer(medium)
    assert len(text) <= MAX_ANSWER and "[" not in text and text.count("less robust") == 4


def test_a_pair_without_an_effect_says_its_finding_and_no_pair_gives_the_fallback():
    assert short_answer([PairVerdict("dsn", "dual", "not-comparable", reason="1 paired sample")]) == \
        "dsn vs dual: not comparable: 1 paired sample (one training seed)"
    assert short_answer([], "only one model: nothing to compare") == "only one model: nothing to compare"
    assert len(short_answer([], "z" * 500)) <= MAX_ANSWER


def test_a_pair_that_is_no_answer_shows_no_number():
    v = PairVerdict("dsn", "dual", "not-comparable", reason="only 1 sample is correct on both (at least 10 needed)",
                    effect=Effect("median distance ratio", 1.25, 1.25, 1.25))
    text = short_answer([v])
    assert "1.25" not in text and text.startswith("dsn vs dual: not comparable: only 1 sample")


def test_a_long_reason_gives_way_before_the_numbers_do():
    reason = "the interval [0.87, 0.93] excludes no difference (1) but the seed-level sign-flip test " * 2
    pairs = [PairVerdict("dsn(hard)", "dsn(open)", "inconclusive", reason=reason,
                         effect=Effect("median distance ratio", 0.90, 0.87, 0.93), scope=seeds_scope(3)),
             _pair("dual", "none", 0.96, 0.88, 1.05, scope=seeds_scope(3))]
    text = short_answer(pairs)
    assert text == ("dsn(hard) vs dsn(open): minimal distance x0.90 [0.87, 0.93], inconclusive; vs dual: x0.96 "
                    "[0.88, 1.05], no evidence of a difference (3 training seeds)")
