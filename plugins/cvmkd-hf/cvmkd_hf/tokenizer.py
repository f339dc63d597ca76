"""A Hugging Face tokenizer behind the interface cvmkd's runs use (``encode``, ``decode``, the
special ids, ``sha256``, ``save``), so that a teacher's own tokenizer governs a run: sources are
tokenised with its source side, targets with its target side, and outputs detokenised with it."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cvmkd_core.errors import ModelError

#: where a model package keeps a Hugging Face tokenizer (instead of tokenizer.model)
FOLDER = "tokenizer-hf"
#: the language pair of a multilingual tokenizer, kept beside its files in a student's package
LANGUAGES = "cvmkd-languages.json"


class HfTokenizer:
    """``AutoTokenizer`` of a local folder, offline. Ids exclude special tokens on ``encode``
    (batching adds the end mark); ``bos_id`` is the decoder's start token where the model has one
    of its own, else the end mark (fairseq's convention; Marian and T5 start from pad, which the
    student models of cvmkd reserve for padding)."""

    def __init__(
        self,
        folder: str | Path,
        *,
        decoder_start_id: int | None = None,
        vocab_size: int | None = None,
        source_lang: str = "",
        target_lang: str = "",
    ) -> None:
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        try:
            self._tok = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"{self.folder}: not a Hugging Face tokenizer folder ({exc})") from None
        if self._tok.pad_token_id is None or self._tok.eos_token_id is None:
            raise ModelError(f"{self.folder}: the tokenizer has no pad or no end-of-sentence token")
        self.languages = self._languages(source_lang, target_lang)
        self._vocab = max(len(self._tok), vocab_size or 0, *self._special_ids())
        start = decoder_start_id if decoder_start_id is not None else self._tok.bos_token_id
        self._bos = start if start is not None and start != self._tok.pad_token_id else self._tok.eos_token_id
        digest = hashlib.sha256()
        for file in sorted(p for p in self.folder.iterdir() if p.is_file() and _is_tokenizer_file(p)):
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
        if self.languages:
            digest.update(json.dumps(self.languages, sort_keys=True).encode())
        self.sha256 = digest.hexdigest()
        self.path = self.folder
        self.from_cache = False

    # --- multilingual tokenizers: the language codes around each side's text -------------------

    @property
    def multilingual(self) -> bool:
        """Whether the tokenizer marks languages with codes (mBART, M2M100, NLLB: ``src_lang``)."""
        return isinstance(getattr(type(self._tok), "src_lang", None), property)

    def _languages(self, source_lang: str, target_lang: str) -> dict[str, str]:
        """Set the language codes (given, or those a student's package recorded) and work out
        which ids the tokenizer puts before each side's text (NLLB: ``fra_Latn``; mBART-50:
        ``fr_XX``; M2M100: ``__fr__``)."""
        self.source_prefix: list[int] = []
        self.target_prefix: list[int] = []
        self._language_ids: set[int] = set()
        recorded = self.folder / LANGUAGES
        if not (source_lang or target_lang) and recorded.is_file():
            saved = json.loads(recorded.read_text("utf-8"))
            source_lang, target_lang = saved.get("source_lang", ""), saved.get("target_lang", "")
        if not self.multilingual:
            if source_lang or target_lang:
                raise ModelError(
                    f"{self.folder}: source_lang/target_lang are for multilingual tokenizers (NLLB, M2M100, "
                    f"mBART); {type(self._tok).__name__} translates one language pair"
                )
            return {}
        if not (source_lang and target_lang):
            raise ModelError(
                f"{self.folder}: {type(self._tok).__name__} is multilingual: give the language codes of the "
                "pair ([teacher] source_lang and target_lang; cvmkd translate --source-lang/--target-lang), "
                "as the tokenizer names them (NLLB: fra_Latn, eng_Latn; M2M100: fr, en; mBART-50: fr_XX, en_XX)"
            )
        unk = self._tok.unk_token_id
        for side, code in (("source_lang", source_lang), ("target_lang", target_lang)):
            try:
                setattr(self._tok, "src_lang" if side == "source_lang" else "tgt_lang", code)
                known = code in self._tok.get_vocab() or bool(getattr(self._tok, "lang_code_to_id", {}).get(code))
                if not known and hasattr(self._tok, "get_lang_id"):
                    known = self._tok.get_lang_id(code) not in (None, unk)
            except (KeyError, ValueError, AttributeError):
                known = False
            if not known:
                raise ModelError(f"{self.folder}: {side} = {code!r} is not a language code of this tokenizer")
        for table in ("lang_code_to_id", "lang_token_to_id"):
            self._language_ids.update(int(i) for i in (getattr(self._tok, table, None) or {}).values())
        self.source_prefix = self._prefix(self._tok(["a"], add_special_tokens=True)["input_ids"][0], "source")
        self.target_prefix = self._prefix(
            self._tok(text_target=["a"], add_special_tokens=True)["input_ids"][0], "target"
        )
        self._language_ids.update(self.source_prefix + self.target_prefix)
        return {"source_lang": source_lang, "target_lang": target_lang}

    def _prefix(self, full: list[int], side: str) -> list[int]:
        """The ids before the text in ``full`` (the tokenizer's encoding of "a", special tokens
        included); the text must end with the end-of-sentence mark alone, which batching adds."""
        plain = self._tok(["a"], add_special_tokens=False)["input_ids"][0]
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                if full[start + len(plain) :] != [self.eos_id]:
                    break
                return list(full[:start])
        raise ModelError(
            f"{self.folder}: cvmkd cannot place this tokenizer's special tokens on the {side} side "
            f"({self._tok.convert_ids_to_tokens(full)} for 'a'): it reads a language code before the text "
            "and the end-of-sentence mark after it"
        )

    def _special_ids(self) -> list[int]:
        return [i + 1 for i in (*self.source_prefix, *self.target_prefix)]

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
        """Source-side ids of each text: the source language's code where the tokenizer has one,
        then the text; batching adds the end-of-sentence mark."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts, not one string")
        prefix = self.source_prefix
        return [[*prefix, *ids] for ids in self._tok(list(texts), add_special_tokens=False)["input_ids"]]

    def encode_targets(self, texts: Sequence[str]) -> list[list[int]]:
        """Target-side ids (a tokenizer with two vocabularies, as Marian's, uses its target side),
        after the target language's code where the tokenizer has one: the first token a
        multilingual model produces."""
        prefix = self.target_prefix
        return [[*prefix, *ids] for ids in self._tok(text_target=list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids_batch: Iterable[Sequence[int]]) -> list[str]:
        """Texts without special tokens or language codes (which some tokenizers do not mark as
        special)."""
        codes = self._language_ids
        rows = [[int(i) for i in ids if int(i) not in codes] for ids in ids_batch]
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
            if file.is_file() and _is_tokenizer_file(file) and file.name != LANGUAGES:
                shutil.copyfile(file, target / file.name)
        if self.languages:  # a student speaks its teacher's language pair
            (target / LANGUAGES).write_text(json.dumps(self.languages, indent=2) + "\n", encoding="utf-8")
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
_NOT_TOKENIZER = {
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "metadata.json",
    LANGUAGES,  # hashed as the languages it holds, given or recorded alike
}


def _is_tokenizer_file(path: Path) -> bool:
    return path.suffix in _TOKENIZER_SUFFIXES and path.name not in _NOT_TOKENIZER and "safetensors" not in path.name
