"""The sacrebleu metrics plugin: installed, and scoring with sacrebleu itself."""

from __future__ import annotations

import pytest
import sacrebleu

from cvmkd_core.plugins import build_plugins
from cvmkd_metrics_sacrebleu import Bleu, BleuConfig, Chrf, ChrfConfig, Ter, TerConfig

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
    assert ter.higher_is_better == {"ter": False}


def test_perfect_and_empty_translations() -> None:
    bleu = Bleu(BleuConfig())
    assert bleu.score(REFS, REFS, [])["bleu"] == pytest.approx(100.0)
    assert bleu.score(["", ""], REFS, [])["bleu"] == 0.0
