"""The sacrebleu metrics plugin: installed, and scoring with sacrebleu itself."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import sacrebleu

import cvmkd_metrics_sacrebleu
from cvmkd_core.plugins import build_plugins
from cvmkd_metrics_sacrebleu import Bleu, BleuConfig, Chrf, ChrfConfig, Ter, TerConfig, extract_statistics, fork_pool

HYPS = ["the cat sat on the mat", "in the beginning god created the heaven"]
REFS = ["the cat sat on the mat", "in the beginning God created the heavens and the earth"]


def test_the_plugin_is_installed_and_registers_its_metrics() -> None:
    plugins = build_plugins()
    for name in ("bleu", "chrf", "ter"):
        assert plugins.registry.get("metric", name).plugin == "sacrebleu"


def test_scores_equal_sacrebleu_and_keep_the_signature() -> None:
    bleu = Bleu(BleuConfig())
    assert bleu.score(HYPS, REFS, [])["bleu"] == sacrebleu.corpus_bleu(HYPS, [REFS]).score
    assert bleu.signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert Chrf(ChrfConfig()).score(HYPS, REFS, [])["chrf"] == sacrebleu.corpus_chrf(HYPS, [REFS]).score
    ter = Ter(TerConfig())
    assert ter.score(HYPS, REFS, [])["ter"] == sacrebleu.corpus_ter(HYPS, [REFS]).score
    assert ter.scores["ter"].higher_is_better is False
    assert bleu.scores["bleu"].higher_is_better is True
    assert ter.scores["ter"].normalise(150.0) == 0.0


def test_perfect_and_empty_translations() -> None:
    bleu = Bleu(BleuConfig())
    assert bleu.score(REFS, REFS, [])["bleu"] == pytest.approx(100.0)
    assert bleu.score(["", ""], REFS, [])["bleu"] == 0.0


def _noisy(references: list[str], keep: float, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(w if rng.random() < keep else "x" for w in r.split()) for r in references]


def test_paired_test_tells_a_real_difference_from_noise() -> None:
    import random

    rng = random.Random(0)
    words = "the a god earth heaven man said to him and".split()
    refs = [" ".join(rng.choice(words) for _ in range(15)) for _ in range(300)]
    worse, better, similar = _noisy(refs, 0.4, 1), _noisy(refs, 0.8, 2), _noisy(refs, 0.4, 3)
    bleu = Bleu(BleuConfig())
    clear = bleu.paired_test(worse, better, refs, [], samples=300)["bleu"]
    assert clear["p_value"] < 0.01
    assert clear["delta"] == pytest.approx(
        sacrebleu.corpus_bleu(better, [refs]).score - sacrebleu.corpus_bleu(worse, [refs]).score
    )
    assert clear["ci95"][0] < clear["mean"] < clear["ci95"][1]
    assert "bs:300" in clear["signature"]
    assert bleu.paired_test(worse, similar, refs, [], samples=300)["bleu"]["p_value"] > 0.05
    assert bleu.paired_test(worse, worse, refs, [])["bleu"] == {"p_value": 1.0, "delta": 0.0}
    ter = Ter(TerConfig()).paired_test(worse, better, refs, [], samples=200)["ter"]
    assert ter["delta"] < 0 and ter["p_value"] < 0.01


#: a pool ended before its second worker ran its initializer, under a run's SIGTERM handler
POOL_ENDED_EARLY = """
import signal, time
import cvmkd_metrics_sacrebleu as m

real = m._default_signals


def slow_start():
    time.sleep(1.0)  # the pool is ended before this worker has its own signal handling
    real()


m._default_signals = slow_start
signal.signal(signal.SIGTERM, lambda signum, frame: None)  # a run's handler: notes, returns
with m.fork_pool(2) as pool:
    pass
print("ended")
"""


def test_a_pool_ended_before_its_workers_started_does_not_wait_for_them_forever() -> None:
    """The workers are forked with SIGTERM blocked until their own handling is in place: the
    pool's SIGTERM used to reach a starting worker's inherited handler, which noted it, and the
    pool then waited for that worker forever (a whole test suite hung on it)."""
    result = subprocess.run([sys.executable, "-c", POOL_ENDED_EARLY], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "ended", result.stderr


@pytest.mark.parametrize(
    "metric", [Bleu(BleuConfig()), Chrf(ChrfConfig()), Ter(TerConfig())], ids=["bleu", "chrf", "ter"]
)
def test_paired_test_equals_sacrebleus_own_paired_test(metric) -> None:
    import random

    from sacrebleu.significance import PairedTest

    rng = random.Random(4)
    words = "the a god earth heaven man said to him and".split()
    refs = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(120)]
    a, b = _noisy(refs, 0.5, 5), _noisy(refs, 0.6, 6)
    metric.score(a, refs, [])  # statistics remembered from scoring are reused
    mine = metric.paired_test(a, b, refs, [], samples=200)[metric.key]
    _, results = PairedTest(
        [("a", a), ("b", b)], {metric.key: metric._metric()}, [refs], test_type="bs", n_samples=200
    )()
    (name,) = [k for k in results if k != "System"]
    theirs = results[name][1]
    assert mine["p_value"] == pytest.approx(theirs.p_value)
    assert mine["mean"] == pytest.approx(theirs.mean, rel=1e-6)
    assert mine["ci95"][1] - mine["mean"] == pytest.approx(theirs.ci, rel=1e-5)
    assert mine["delta"] == pytest.approx(theirs.score - results[name][0].score)


def test_ter_statistics_from_several_processes_equal_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from sacrebleu.metrics import TER

    references = [f"and {w} said unto them , go ye into the city of {w}" for w in ("jerusalem", "david", "zion")] * 20
    hypotheses = _noisy(references, 0.6, seed=3)
    serial = extract_statistics(TER(), hypotheses, references, workers=1)
    assert extract_statistics(TER(), hypotheses, references, workers=3) == serial
    # the metric itself goes parallel for corpora of PARALLEL_MIN_SENTENCES sentences or more
    monkeypatch.setattr(cvmkd_metrics_sacrebleu, "PARALLEL_MIN_SENTENCES", 10)
    monkeypatch.setattr(cvmkd_metrics_sacrebleu, "_cores", lambda: 2)
    used: list[int] = []
    real = cvmkd_metrics_sacrebleu.extract_statistics
    monkeypatch.setattr(
        cvmkd_metrics_sacrebleu,
        "extract_statistics",
        lambda metric, hyps, refs, workers: used.append(workers) or real(metric, hyps, refs, workers),
    )
    score = Ter(TerConfig()).score(hypotheses, references, [])["ter"]
    assert used == [2]
    assert score == sacrebleu.corpus_ter(hypotheses, [references]).score


def _dispositions(_: int) -> tuple[bool, bool]:
    """In a worker: whether SIGTERM has its default action and Ctrl-C is ignored."""
    return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_pool_workers_take_sigterm_by_default_under_a_run_s_handlers() -> None:
    """A run's loop handles SIGTERM by noting it and returning; forked workers that inherited
    that handler survived the pool's SIGTERM and the validation waited for them forever."""
    noted: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: noted.append(signum))
    try:
        with fork_pool(2) as pool:
            assert pool.map(_dispositions, range(2), chunksize=1) == [(True, True)] * 2
            workers = list(pool._pool)
            pool.terminate()  # what leaving the block does: SIGTERM to the idle workers, then join
        # each ended: on its sentinel (0) or on the SIGTERM, not caught by the handler
        assert all(w.exitcode in (0, -signal.SIGTERM) for w in workers)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert noted == []


@pytest.mark.parametrize(
    "metric", [Bleu(BleuConfig()), Chrf(ChrfConfig()), Ter(TerConfig())], ids=["bleu", "chrf", "ter"]
)
def test_resampled_scores_are_sacrebleus_corpus_scores_of_the_resampled_sentences(metric) -> None:
    """Each resample's score, from remembered statistics, is what sacrebleu gives the resampled
    sentences scored afresh."""
    import numpy as np

    refs = ["the cat sat on the mat", "a dog ran in the park", "it rained all day long", "we ate bread and fish"]
    hyps = ["the cat sat on a mat", "the dog ran in a park", "it rained the whole day", "we ate fish"]
    indices = np.array([[0, 0, 1, 3], [2, 3, 3, 1], [1, 2, 0, 0]])
    resampled = metric.resampled_scores(hyps, refs, [], indices)[metric.key]
    fresh = {"bleu": sacrebleu.BLEU(), "chrf": sacrebleu.CHRF(), "ter": sacrebleu.TER()}[metric.key]
    for row, value in zip(indices, resampled):
        expected = fresh.corpus_score([hyps[i] for i in row], [[refs[i] for i in row]]).score
        assert value == pytest.approx(expected, abs=1e-4)
