"""pytest fixtures for cvmkd and its plugins, loaded through the ``pytest11`` entry point of the
``cvmkd-testing`` distribution: a test anywhere asks for them by name."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from cvmkd_core.plugins import Plugins
from cvmkd_testing import TOY_HOOK_FILE, toy_plugin_manager


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write a dedented text file under tmp_path and return its path."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return _write


@pytest.fixture
def toy_plugins() -> Plugins:
    """Built-ins, validation and test evaluation, and the toy trainer and metric; no other entry
    points, so installed plugins don't interfere."""
    return toy_plugin_manager()


@pytest.fixture
def toy_hook_file(write: Callable[[str, str], Path]) -> Path:
    return write("toy_hooks.py", TOY_HOOK_FILE)


@pytest.fixture(scope="session")
def tiny_teacher_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny teacher package for the whole test run (made once): the ``tiny`` preset on a
    tokenizer of :func:`~cvmkd_testing.write_tiny_corpus`'s corpus, written by ``save_package``.
    Its weights are untrained: tests of plumbing (loading, naming, distilling from it) need a
    real package, not a good one. ``corpus.tsv`` lies beside the package folder."""
    import torch

    from cvmkd_nmt.data.tokenizer import train_tokenizer
    from cvmkd_nmt.model.package import save_package
    from cvmkd_nmt.model.presets import preset
    from cvmkd_nmt.model.transformer import CvmTransformer
    from cvmkd_testing import write_tiny_corpus

    root = tmp_path_factory.mktemp("tiny-teacher")
    corpus = write_tiny_corpus(root)
    pairs = [tuple(line.split("\t")) for line in corpus.read_text().splitlines()]
    tokenizer = train_tokenizer(pairs, vocab_size=40, cache_dir=root / "tokenizers")
    torch.manual_seed(0)
    model = CvmTransformer(preset("tiny", vocab_size=tokenizer.vocab_size))
    return save_package(root / "package", model, tokenizer, {"role": "teacher"})


@pytest.fixture(scope="session")
def tiny_kd_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for every test that distils with :data:`~cvmkd_testing.TINY_KD_RECIPE`
    (set ``run.cache_dir`` to it): the first such run trains the tiny teacher and its tokenizer,
    every later one reuses them, as a user's second run would. Tests about training or caching
    the teacher itself use a folder of their own."""
    return tmp_path_factory.mktemp("tiny-kd-cache")
