"""cvmkd-metrics-sacrebleu: corpus-level BLEU, chrF and TER on detokenised text, by sacrebleu.

Each metric keeps the signature of its last computation (``metric.signature``), which says
exactly how the score was computed (tokenizer, smoothing, version), so scores are comparable.
``paired_test`` runs sacrebleu's paired bootstrap resampling (1,000 resamples by default, seed
12345 unless ``SACREBLEU_SEED`` says otherwise) of one system's hypotheses against another's, on
sufficient statistics the metric remembers from scoring, so a validation extracts them once.
(It uses sacrebleu's statistics API, ``_extract_corpus_statistics`` and friends, as sacrebleu's
own ``PairedTest`` does; a test checks the results equal ``PairedTest``'s.)
"""

from __future__ import annotations

import abc
import os
import signal
from typing import Any

import attrs

from cvmkd_core.config import ge, one_of
from cvmkd_core.hookspecs import hookimpl
from cvmkd_validation.metrics import ScoreSpec

__version__ = "0.1.0"

#: systems whose sufficient statistics each metric remembers (this validation, the previous one)
CACHED_SYSTEMS = 3
#: TER's statistics are extracted by up to this many processes for corpora of at least
#: PARALLEL_MIN_SENTENCES sentences (its shift search is slow Python: ~13 s per thousand
#: sentences, while training waits for the validation and the CPU's cores are free)
PARALLEL_WORKERS = 4
PARALLEL_MIN_SENTENCES = 256


@attrs.frozen
class BleuConfig:
    """``{name = "bleu", tokenize = "13a", lowercase = false}``."""

    tokenize: str = attrs.field(default="13a", validator=one_of("13a", "intl", "char", "none"))
    lowercase: bool = False


@attrs.frozen
class ChrfConfig:
    """``{name = "chrf", word_order = 0}`` (2 gives chrF++)."""

    word_order: int = attrs.field(default=0, validator=ge(0))


@attrs.frozen
class TerConfig:
    """``{name = "ter", case_sensitive = false}``."""

    case_sensitive: bool = False


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _chunk_statistics(job: tuple[Any, list[str], list[str]]) -> Any:
    metric, hypotheses, references = job
    return metric._extract_corpus_statistics(hypotheses, [references])


#: the signals a pool worker must not take with its parent's handlers
_WORKER_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _default_signals() -> None:
    """A pool worker's start: SIGTERM back to its default, Ctrl-C left to the parent, then the
    two unblocked (:func:`fork_pool` forks with them blocked). Forked workers inherit a running
    loop's handlers, which only note an interruption and return: a worker that took the pool's
    SIGTERM that way never ended, and the run waited for it forever."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _WORKER_SIGNALS)


def fork_pool(workers: int) -> Any:
    """A ``multiprocessing`` pool of ``workers`` forked processes with default signal handling
    (see :func:`_default_signals`). Linux only (``fork``).

    The workers are forked with SIGTERM and SIGINT blocked: a pool ended before a worker ran its
    initializer (one worker took every task) sends SIGTERM to a process still holding the
    parent's handlers; blocked, the signal waits until the worker's own handling is in place and
    then ends it, where it used to be noted, leaving the worker waiting for a task forever."""
    import multiprocessing

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_SIGNALS)
    try:
        return multiprocessing.get_context("fork").Pool(workers, initializer=_default_signals)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def extract_statistics(metric: Any, hypotheses: list[str], references: list[str], workers: int = 1) -> list[Any]:
    """sacrebleu's per-sentence statistics of ``hypotheses`` against ``references``: those of
    ``metric._extract_corpus_statistics``, computed by ``workers`` forked processes on
    contiguous chunks when ``workers`` > 1 (each sentence's statistics depend on that sentence
    alone, so the concatenation is the same list). Without ``fork`` (not Linux), in this process."""
    import multiprocessing

    workers = min(workers, len(hypotheses))
    if workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return list(metric._extract_corpus_statistics(hypotheses, [references]))
    bounds = [len(hypotheses) * i // workers for i in range(workers + 1)]
    jobs = [(metric, hypotheses[a:b], references[a:b]) for a, b in zip(bounds, bounds[1:])]
    with fork_pool(workers) as pool:
        chunks = pool.map(_chunk_statistics, jobs)
        # the workers end on the pool's sentinels; leaving the block terminates them with
        # SIGTERM, which is for the error path
        pool.close()
        pool.join()
    return [stats for chunk in chunks for stats in chunk]


class _Sacrebleu(abc.ABC):
    key = ""
    spec = ScoreSpec()
    #: whether statistics are worth extracting in several processes (see PARALLEL_WORKERS)
    parallel = False

    def __init__(self, config: Any) -> None:
        self.config = config
        self.signature = ""
        self.scores = {self.key: self.spec}
        self._cache: list[tuple[Any, Any]] = []

    @abc.abstractmethod
    def _metric(self) -> Any:
        """The sacrebleu metric object, built from the config."""

    def _statistics(self, metric: Any, hypotheses: list[str], references: list[str]) -> Any:
        """sacrebleu's per-sentence sufficient statistics, remembered for the last few systems:
        validation scores a system once and tests it against the previous one, so each
        validation extracts statistics once (TER's are slow: seconds per thousand sentences)."""
        key = (tuple(hypotheses), tuple(references))
        for cached_key, stats in self._cache:
            if cached_key == key:
                return stats
        workers = 1
        if self.parallel and len(hypotheses) >= PARALLEL_MIN_SENTENCES:
            workers = min(PARALLEL_WORKERS, _cores())
        stats = extract_statistics(metric, list(hypotheses), list(references), workers)
        self._cache = [*self._cache[-(CACHED_SYSTEMS - 1) :], (key, stats)]
        return stats

    def score(self, hypotheses: list[str], references: list[str], sources: list[str]) -> dict[str, float]:
        metric = self._metric()
        stats = self._statistics(metric, hypotheses, references)
        result = metric._aggregate_and_compute(stats)
        metric.num_refs = 1
        self.signature = str(metric.get_signature())
        return {self.key: float(result.score)}

    def resampled_scores(
        self, hypotheses: list[str], references: list[str], sources: list[str], indices: Any
    ) -> dict[str, list[float]]:
        """The corpus score of each resample of the sentences (a row of ``indices``), computed
        from sacrebleu's per-sentence sufficient statistics as its paired bootstrap computes them."""
        import numpy as np

        metric = self._metric()
        stats = np.array(self._statistics(metric, hypotheses, references), dtype="float32")
        return {self.key: [float(metric._compute_score_from_stats(s.sum(0)).score) for s in stats[np.asarray(indices)]]}

    def paired_test(
        self,
        baseline: list[str],
        hypotheses: list[str],
        references: list[str],
        sources: list[str],
        *,
        samples: int = 1000,
    ) -> dict[str, dict[str, Any]]:
        """Paired bootstrap resampling of ``hypotheses`` against ``baseline``, computed as
        sacrebleu's ``PairedTest(test_type="bs")`` computes it (same resampled indices for the
        same seed, same statistic and p-value), on remembered sufficient statistics."""
        import numpy as np
        from sacrebleu.significance import _compute_p_value, estimate_ci

        if list(baseline) == list(hypotheses):
            # the statistic is degenerate for identical systems (every resampled difference
            # is 0, giving p = 1/(samples+1)); identical output cannot differ
            return {self.key: {"p_value": 1.0, "delta": 0.0}}
        metric = self._metric()
        before_stats = np.array(self._statistics(metric, baseline, references), dtype="float32")
        after_stats = np.array(self._statistics(metric, hypotheses, references), dtype="float32")
        before = metric._aggregate_and_compute(self._statistics(metric, baseline, references)).score
        after = metric._aggregate_and_compute(self._statistics(metric, hypotheses, references)).score
        seed_text = os.environ.get("SACREBLEU_SEED", "12345")
        seed = None if seed_text.lower() == "none" else int(seed_text)
        rng = np.random.default_rng(seed)
        idxs = rng.choice(len(hypotheses), size=(samples, len(hypotheses)), replace=True)
        scores_before = np.array([metric._compute_score_from_stats(s.sum(0)).score for s in before_stats[idxs]])
        scores_after = np.array([metric._compute_score_from_stats(s.sum(0)).score for s in after_stats[idxs]])
        mean, ci = estimate_ci(scores_after)
        sample_diffs = np.abs(scores_after - scores_before)
        p_value = _compute_p_value(sample_diffs - sample_diffs.mean(), abs(before - after))
        metric.num_refs = 1  # what extracting statistics would have set (one reference stream)
        signature = metric.get_signature()
        signature.update("seed", str(seed).lower())
        signature.update("bs", samples)
        return {
            self.key: {
                "p_value": float(p_value),
                "delta": float(after - before),
                "mean": float(mean),
                "ci95": [float(mean - ci), float(mean + ci)],
                "signature": str(signature),
            }
        }


class Bleu(_Sacrebleu):
    """Corpus BLEU (sacrebleu), 0-100, higher is better."""

    key = "bleu"
    spec = ScoreSpec(True, 0.0, 100.0, "corpus BLEU")

    def _metric(self) -> Any:
        from sacrebleu.metrics import BLEU

        return BLEU(tokenize=self.config.tokenize, lowercase=self.config.lowercase)


class Chrf(_Sacrebleu):
    """Corpus chrF (sacrebleu), 0-100, higher is better."""

    key = "chrf"
    spec = ScoreSpec(True, 0.0, 100.0, "corpus chrF")

    def _metric(self) -> Any:
        from sacrebleu.metrics import CHRF

        return CHRF(word_order=self.config.word_order)


class Ter(_Sacrebleu):
    """Corpus TER (sacrebleu), 0 and up, lower is better."""

    key = "ter"
    spec = ScoreSpec(False, 0.0, 100.0, "translation edit rate; above 100 normalises to 0")
    parallel = True

    def _metric(self) -> Any:
        from sacrebleu.metrics import TER

        return TER(case_sensitive=self.config.case_sensitive)


@hookimpl
def cvmkd_register(register: Any) -> None:
    register.metric("bleu", Bleu, config=BleuConfig)
    register.metric("chrf", Chrf, config=ChrfConfig)
    register.metric("ter", Ter, config=TerConfig)
