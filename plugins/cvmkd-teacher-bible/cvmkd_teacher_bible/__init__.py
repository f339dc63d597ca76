"""The pre-trained teacher cvmkd ships for its embedded corpus: a fr→en translation model of the
Bible corpus (``cvmkd-corpus-bible``), trained by ``recipes/teacher.toml`` and registered as the
model package ``bible-fr-en``. Recipes name it as ``[teacher] checkpoint = "bible-fr-en"``, and
``cvmkd translate --model bible-fr-en`` runs it. See docs/teacher.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cvmkd_core import hookimpl

#: the registered name and the folder of the package (weights in float16, config, tokenizer, metadata)
NAME = "bible-fr-en"
PACKAGE = Path(__file__).resolve().parent / NAME


@hookimpl
def cvmkd_register(register: Any) -> None:
    register.package(NAME, PACKAGE)
