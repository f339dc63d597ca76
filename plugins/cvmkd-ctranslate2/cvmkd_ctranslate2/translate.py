"""Translate with a CTranslate2 export: the package's SentencePiece tokenizer around
``ctranslate2.Translator``, with the same length limit as cvmkd's own decoding
(``1.5 × source length + 10`` tokens, within the model's maximum length)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cvmkd_core.errors import ModelError


class CTranslate2Translator:
    """``translate(sources, beam_size, batch_size)`` over a CTranslate2 export folder."""

    def __init__(self, folder: Path, device: str = "cpu", intra_threads: int = 0) -> None:
        """``intra_threads``: CPU threads for one translation (0: as many as torch uses)."""
        import ctranslate2

        from cvmkd_ctranslate2 import METADATA
        from cvmkd_nmt.data.tokenizer import Tokenizer
        from cvmkd_nmt.model.package import TOKENIZER

        self.folder = Path(folder)
        self.metadata = json.loads((self.folder / METADATA).read_text("utf-8"))
        # a student saved as a Hugging Face folder brings that tokenizer, and its CTranslate2
        # model reads the source's end-of-sentence mark as the tokenizer writes it
        self.hf = (self.folder / "tokenizer-hf").is_dir()
        self.tokenizer: Any
        if self.hf:
            from cvmkd_nmt.model.package import tokenizer_format

            reader = tokenizer_format("hf")
            if reader is None:
                raise ModelError(
                    f"{self.folder}: its tokenizer is a Hugging Face tokenizer: install the plugin cvmkd-hf"
                )
            self.tokenizer = reader(self.folder / "tokenizer-hf")
        else:
            self.tokenizer = Tokenizer.load(self.folder / TOKENIZER)
        self.max_len = int(self.metadata["export"].get("max_len", 512))
        # pad is never a target of a student of a Hugging Face teacher: suppressed as its own
        # decoding suppresses it, where the converted vocabulary still holds it (Marian's does not)
        self.pad = ""
        if self.hf and self.metadata["export"].get("converter"):
            vocabulary = next(iter(sorted(self.folder.glob("*vocabulary.json"))), None)
            pad = self.tokenizer.id_to_piece(self.tokenizer.pad_id)
            if vocabulary is not None and pad in json.loads(vocabulary.read_text("utf-8")):
                self.pad = pad
        try:
            self.adds_eos = bool(json.loads((self.folder / "config.json").read_text("utf-8")).get("add_source_eos"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"CTranslate2 export {self.folder}: config.json is missing or damaged ({exc})") from None
        try:
            import torch

            self.translator = ctranslate2.Translator(
                str(self.folder), device=device, inter_threads=1, intra_threads=intra_threads or torch.get_num_threads()
            )
        except (RuntimeError, ValueError) as exc:
            raise ModelError(f"CTranslate2 export {self.folder}: cannot load it ({exc})") from None

    def _limit(self, source_pieces: int) -> int:
        """The most tokens a translation may have: 1.5 × the source length (with its
        end-of-sentence mark) + 10, within the model's positions."""
        return min(int(1.5 * (source_pieces + 1) + 10), self.max_len)

    def translate(self, sources: list[str], beam_size: int = 1, batch_size: int = 32) -> list[str]:
        """Translations of ``sources`` in order; batches of similar lengths, as cvmkd decodes."""
        tokenizer = self.tokenizer
        # the end-of-sentence mark, unless the model adds it itself (a cvm export: add_source_eos)
        end = [] if self.adds_eos else [tokenizer.id_to_piece(tokenizer.eos_id)]
        # a multilingual Hugging Face model's translation starts with the target language's code,
        # which its own decoding forces (forced_bos_token_id); a cvm student learnt to write it
        forced = getattr(tokenizer, "target_prefix", []) if self.metadata["export"].get("converter") else []
        prefix = [tokenizer.id_to_piece(i) for i in forced]
        pieces = [
            [tokenizer.id_to_piece(i) for i in ids[: self.max_len - 1]] + end for ids in tokenizer.encode(sources)
        ]
        order = sorted(range(len(pieces)), key=lambda i: len(pieces[i]))
        out: list[str] = [""] * len(sources)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            longest = max(len(pieces[i]) - len(end) for i in chunk)
            results = self.translator.translate_batch(
                [pieces[i] for i in chunk],
                beam_size=beam_size,
                max_batch_size=batch_size,
                max_decoding_length=self._limit(longest),
                return_scores=False,
                **({"target_prefix": [prefix] * len(chunk)} if prefix else {}),
                **({"suppress_sequences": [[self.pad]]} if self.pad else {}),
            )
            # each sentence within its own limit, as cvmkd's decoding stops it (the batch ran to
            # the longest one's): for greedy decoding this is exactly the shorter run's output
            ids = [
                [tokenizer.piece_to_id(p) for p in r.hypotheses[0]][: self._limit(len(pieces[i]) - len(end))]
                for i, r in zip(chunk, results)
            ]
            for i, text in zip(chunk, tokenizer.decode(ids)):
                out[i] = text
        return out
