"""Built-in error analysis of one validation's translations (``cvmkd_analyze``).

It finds what corpus scores hide: the length ratio and scores by sentence length, the worst
sentences by sentence-level chrF (sacrebleu), repetition loops, empty outputs, untranslated
copies of the source, the rate of unknown tokens, and the sentences that got clearly worse
(or better) since the previous validation. Findings go to ``details["analysis"]["errors"]``;
one summary line goes to the log.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from cvmkd_core.hookspecs import hookimpl
from cvmkd_core.plugins import add_hookspecs
from cvmkd_core.state import RunState
from cvmkd_validation import hookspecs
from cvmkd_validation.records import TranslationSample

log = logging.getLogger("cvmkd")

#: reference-length buckets, in words
BUCKETS = ((1, 10), (11, 20), (21, 30), (31, 45), (46, None))
#: what SentencePiece decodes an unknown piece to
UNKNOWN = "\u2047"
#: a unit of 1-4 words repeated this many times in a row is a loop
LOOP_REPEATS = 3
#: a hypothesis closer to the source than to the reference, with at least this sentence chrF
#: against the source, is an untranslated copy
COPY_CHRF = 50.0


def sentence_chrf(hypotheses: list[str], references: list[str]) -> list[float]:
    """sacrebleu's sentence-level chrF of each hypothesis against its reference."""
    from sacrebleu.metrics import CHRF

    metric = CHRF()
    return [float(metric.sentence_score(h, [r]).score) for h, r in zip(hypotheses, references)]


#: a letter repeated this many times in a row inside a word is a loop too ("ribbbbbbbb")
CHAR_LOOP = re.compile(r"([^\W\d_])\1{5,}")


def repeated_unit(words: list[str], repeats: int = LOOP_REPEATS) -> str | None:
    """The first unit of 1-4 words repeated ``repeats`` times in a row in ``words``, or a letter
    repeated six or more times in a row inside a word; None when there is neither."""
    for word in words:
        match = CHAR_LOOP.search(word)
        if match:
            return match.group(1)
    for size in range(1, 5):
        for start in range(0, len(words) - size * repeats + 1):
            unit = words[start : start + size]
            if all(words[start + k * size : start + (k + 1) * size] == unit for k in range(1, repeats)):
                return " ".join(unit)
    return None


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def _example(i: int, sample: TranslationSample, **extra: Any) -> dict[str, Any]:
    return {
        "index": i,
        "source": sample.sources[i],
        "reference": sample.references[i],
        "hypothesis": sample.hypotheses[i],
        **extra,
    }


def _bucket_name(low: int, high: int | None) -> str:
    return f"{low}-{high}" if high is not None else f"{low}+"


def analyse(
    sample: TranslationSample, *, worst: int = 5, examples: int = 3, regression_drop: float = 20.0
) -> dict[str, Any]:
    """The error analysis of ``sample``, as a JSON-serialisable dict with a ``summary`` line."""
    from sacrebleu.metrics import BLEU

    n = len(sample.hypotheses)
    chrf = sentence_chrf(sample.hypotheses, sample.references)
    hyp_words = [h.split() for h in sample.hypotheses]
    ref_words = [r.split() for r in sample.references]
    total_hyp = sum(map(len, hyp_words))
    total_ref = sum(map(len, ref_words))

    length = {
        "ratio": round(total_hyp / total_ref, 4) if total_ref else None,
        "hypothesis_words_mean": round(total_hyp / n, 2) if n else 0.0,
        "reference_words_mean": round(total_ref / n, 2) if n else 0.0,
        "too_short": sum(1 for h, r in zip(hyp_words, ref_words) if len(h) < 0.5 * len(r)),
        "too_long": sum(1 for h, r in zip(hyp_words, ref_words) if len(h) > 2 * max(len(r), 1)),
    }

    buckets = []
    for low, high in BUCKETS:
        members = [i for i, r in enumerate(ref_words) if len(r) >= low and (high is None or len(r) <= high)]
        if not members:
            continue
        hyps = [sample.hypotheses[i] for i in members]
        refs = [sample.references[i] for i in members]
        h_len = sum(len(hyp_words[i]) for i in members)
        r_len = sum(len(ref_words[i]) for i in members)
        buckets.append(
            {
                "reference_words": _bucket_name(low, high),
                "sentences": len(members),
                "bleu": round(float(BLEU().corpus_score(hyps, [refs]).score), 2),
                "chrf_mean": round(sum(chrf[i] for i in members) / len(members), 2),
                "length_ratio": round(h_len / r_len, 4) if r_len else None,
            }
        )

    order = sorted(range(n), key=lambda i: (chrf[i], i))
    worst_list = [_example(i, sample, chrf=round(chrf[i], 2)) for i in order[:worst]]

    loops = []
    for i, words in enumerate(hyp_words):
        unit = repeated_unit(words)
        if unit is not None:
            loops.append((i, unit))
    empty = [i for i, h in enumerate(sample.hypotheses) if not h.strip()]

    source_chrf = sentence_chrf(sample.hypotheses, sample.sources)
    copies = [
        i
        for i in range(n)
        if sample.hypotheses[i].strip()
        and (
            _norm(sample.hypotheses[i]) == _norm(sample.sources[i])
            or (source_chrf[i] >= COPY_CHRF and source_chrf[i] > chrf[i])
        )
        and _norm(sample.hypotheses[i]) != _norm(sample.references[i])
    ]
    unknown_words = sum(1 for words in hyp_words for w in words if UNKNOWN in w)

    findings: dict[str, Any] = {
        "sentences": n,
        "chrf_mean": round(sum(chrf) / n, 2) if n else 0.0,
        "length": length,
        "by_reference_length": buckets,
        "worst": worst_list,
        "loops": {
            "count": len(loops),
            "rate": round(len(loops) / n, 4) if n else 0.0,
            "examples": [_example(i, sample, repeated=unit) for i, unit in loops[:examples]],
        },
        "empty": {"count": len(empty), "examples": [_example(i, sample) for i in empty[:examples]]},
        "copies": {
            "count": len(copies),
            "examples": [_example(i, sample, chrf_to_source=round(source_chrf[i], 2)) for i in copies[:examples]],
        },
        "unknown_tokens": {
            "count": unknown_words,
            "rate": round(unknown_words / total_hyp, 5) if total_hyp else 0.0,
        },
    }

    if sample.previous is not None and len(sample.previous) == n:
        before = sentence_chrf(sample.previous, sample.references)
        change = [chrf[i] - before[i] for i in range(n)]
        worse = sorted((i for i in range(n) if change[i] <= -regression_drop), key=lambda i: (change[i], i))
        better = [i for i in range(n) if change[i] >= regression_drop]
        findings["changes"] = {
            "against_step": sample.previous_step,
            "threshold_chrf": regression_drop,
            "worse": len(worse),
            "better": len(better),
            "unchanged_output": sum(1 for a, b in zip(sample.previous, sample.hypotheses) if a == b),
            "worse_examples": [
                _example(
                    i,
                    sample,
                    previous_hypothesis=sample.previous[i],
                    chrf=round(chrf[i], 2),
                    previous_chrf=round(before[i], 2),
                )
                for i in worse[:examples]
            ],
        }
    findings["summary"] = _summary(findings)
    return findings


def _summary(f: dict[str, Any]) -> str:
    ratio = f["length"]["ratio"]
    parts = [
        f"length ratio {ratio:.2f}" if ratio is not None else "no reference words",
        f"mean sentence chrF {f['chrf_mean']:.1f}",
        f"{f['empty']['count']} empty",
        f"{f['loops']['count']} with loops",
        f"{f['copies']['count']} untranslated copies",
        f"unknown tokens {100 * f['unknown_tokens']['rate']:.2f}%",
    ]
    changes = f.get("changes")
    if changes:
        parts.append(
            f"{changes['worse']} clearly worse and {changes['better']} clearly better than step {changes['against_step']}"
        )
    if f["worst"]:
        w = f["worst"][0]
        parts.append(f"worst (chrF {w['chrf']:.1f}): {w['hypothesis'][:60]!r}")
    return "; ".join(parts)


@hookimpl
def cvmkd_addhooks(pluginmanager: Any) -> None:
    add_hookspecs(pluginmanager, hookspecs)


@hookimpl
def cvmkd_analyze(state: RunState, sample: TranslationSample) -> dict[str, Any]:
    config = state.recipe.section("validation").analysis
    findings = analyse(sample, worst=config.worst, examples=config.examples, regression_drop=config.regression_drop)
    log.info("analysis at step %d: %s", sample.step, findings["summary"])
    return {"errors": findings}
