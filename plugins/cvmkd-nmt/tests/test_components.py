"""The core's own components: the cvm model spec and corpora read from files."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvmkd_core.config import structure
from cvmkd_core.errors import RecipeError
from cvmkd_nmt.errors import CorpusError
from cvmkd_nmt.plugin import CvmModel, CvmSpec, FilesConfig, FilesCorpus


def test_a_preset_with_overrides_takes_its_vocabulary_from_the_tokenizer() -> None:
    spec = structure({"preset": "student-cpu", "d_model": 128, "dropout": 0.0}, CvmSpec, "student.model")
    config = CvmModel(spec).model_config(vocab_size=1234)
    assert (config.vocab_size, config.d_model, config.dropout) == (1234, 128, 0.0)
    assert (config.n_encoder_layers, config.n_decoder_layers) == (3, 3)  # from the preset


def test_an_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(RecipeError, match=r"student.model.preset: must be one of .*'student-cpu'.*got 'huge'"):
        structure({"preset": "huge"}, CvmSpec, "student.model")


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_parallel_files_with_held_out_splits(tmp_path: Path) -> None:
    _write(tmp_path / "train.fr", [f"phrase {i}" for i in range(30)])
    _write(tmp_path / "train.en", [f"sentence {i}" for i in range(30)])
    config = FilesConfig(
        train=str(tmp_path / "train"), format="parallel", source_lang="fr", target_lang="en", valid_size=5, test_size=4
    )
    splits = FilesCorpus(config).load()
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (21, 5, 4)
    assert (splits.source_lang, splits.target_lang) == ("fr", "en")
    everything = {p[0] for p in splits.train + splits.valid + splits.test}
    assert everything == {f"phrase {i}" for i in range(30)}
    assert FilesCorpus(config).load().fingerprint == splits.fingerprint  # deterministic


def test_misaligned_files_name_both(tmp_path: Path) -> None:
    _write(tmp_path / "t.fr", ["a", "b", "c"])
    _write(tmp_path / "t.en", ["x", "y"])
    config = FilesConfig(train=str(tmp_path / "t"), format="parallel", source_lang="fr", target_lang="en")
    with pytest.raises(CorpusError, match=r"t.fr has 3 lines but .*t.en has 2"):
        FilesCorpus(config).load()


def test_a_files_corpus_needs_a_training_file() -> None:
    with pytest.raises(RecipeError, match="corpus: train: give the training file"):
        structure({"format": "tsv"}, FilesConfig, "corpus")
