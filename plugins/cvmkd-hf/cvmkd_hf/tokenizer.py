"""A Hugging Face tokenizer behind the interface cvmkd's runs use (``encode``, ``decode``, the
special ids, ``sha256``, ``save``), so that a teacher's own tokenizer governs a run: sources are
tokenised with its source side, targets with its target side, and outputs detokenised with it."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cvmkd_core.errors import ModelError

#: where a model package keeps a Hugging Face tokenizer (instead of tokenizer.model)
FOLDER = "tokenizer-hf"


class HfTokenizer:
    """``AutoTokenizer`` of a local folder, offline. Ids exclude special tokens on ``encode``
    (batching adds the end mark); ``bos_id`` is the decoder's start token where the model has one
    of its own, else the end mark (fairseq's convention; Marian and T5 start from pad, which the
    student models of cvmkd reserve for padding)."""

    def __init__(
        self, folder: str | Path, *, decoder_start_id: int | None = None, vocab_size: int | None = None
    ) -> None:
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        try:
            self._tok = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"{self.folder}: not a Hugging Face tokenizer folder ({exc})") from None
        if self._tok.pad_token_id is None or self._tok.eos_token_id is None:
            raise ModelError(f"{self.folder}: the tokenizer has no pad or no end-of-sentence token")
        self._vocab = max(len(self._tok), vocab_size or 0)
        start = decoder_start_id if decoder_start_id is not None else self._tok.bos_token_id
        self._bos = start if start is not None and start != self._tok.pad_token_id else self._tok.eos_token_id
        digest = hashlib.sha256()
        for file in sorted(p for p in self.folder.iterdir() if p.is_file() and _is_tokenizer_file(p)):
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
        self.sha256 = digest.hexdigest()
        self.path = self.folder
        self.from_cache = False

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def pad_id(self) -> int:
        return int(self._tok.pad_token_id)

    @property
    def bos_id(self) -> int:
        return int(self._bos)

    @property
    def eos_id(self) -> int:
        return int(self._tok.eos_token_id)

    @property
    def unk_id(self) -> int:
        return int(self._tok.unk_token_id if self._tok.unk_token_id is not None else self._tok.eos_token_id)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Source-side ids of each text, without special tokens."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts, not one string")
        return [list(ids) for ids in self._tok(list(texts), add_special_tokens=False)["input_ids"]]

    def encode_targets(self, texts: Sequence[str]) -> list[list[int]]:
        """Target-side ids (a tokenizer with two vocabularies, as Marian's, uses its target side)."""
        return [list(ids) for ids in self._tok(text_target=list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids_batch: Iterable[Sequence[int]]) -> list[str]:
        rows = [[int(i) for i in ids] for ids in ids_batch]
        return [text.strip() for text in self._tok.batch_decode(rows, skip_special_tokens=True)]

    def id_to_piece(self, i: int) -> str:
        return str(self._tok.convert_ids_to_tokens(int(i)))

    def piece_to_id(self, piece: str) -> int:
        return int(self._tok.convert_tokens_to_ids(piece))  # type: ignore[arg-type]

    def save(self, directory: str | Path, into: str = FOLDER) -> Path:
        """The tokenizer's own files, byte for byte, into ``directory/tokenizer-hf`` (or
        ``directory/into``)."""
        target = Path(directory) / into
        target.mkdir(parents=True, exist_ok=True)
        for file in self.folder.iterdir():
            if file.is_file() and _is_tokenizer_file(file):
                shutil.copyfile(file, target / file.name)
        return target

    @classmethod
    def load(
        cls, folder: str | Path, vocab_size: int | None = None, decoder_start_id: int | None = None
    ) -> HfTokenizer:
        return cls(folder, vocab_size=vocab_size, decoder_start_id=decoder_start_id)

    def __deepcopy__(self, memo: dict[int, Any]) -> HfTokenizer:
        return self  # read-only once loaded: a copy of a model shares its tokenizer


#: the files of a Hugging Face folder that belong to its tokenizer (not the model's weights)
_TOKENIZER_SUFFIXES = (".spm", ".model", ".json", ".txt", ".tiktoken")
_NOT_TOKENIZER = {"config.json", "generation_config.json", "model.safetensors.index.json", "metadata.json"}


def _is_tokenizer_file(path: Path) -> bool:
    return path.suffix in _TOKENIZER_SUFFIXES and path.name not in _NOT_TOKENIZER and "safetensors" not in path.name
