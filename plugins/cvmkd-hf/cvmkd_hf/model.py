"""A Hugging Face ``AutoModelForSeq2SeqLM`` behind the interface cvmkd's runs use for a teacher:
``forward(src, tgt_in) -> logits`` for word-level KD, ``translate_texts`` for validation and
sequence-level KD, ``timed_decode`` for the speed measurements, and a ``config`` with the shape
cvmkd reads (vocabulary, maximum length, special ids)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from cvmkd_core.errors import ModelError
from cvmkd_hf.tokenizer import HfTokenizer


@attrs.frozen
class HfShape:
    """What cvmkd reads of a model's configuration."""

    vocab_size: int
    max_len: int
    pad_id: int
    bos_id: int
    eos_id: int
    architecture: str = ""

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


#: the logit pad gets in training: far below any other, finite (a KD loss takes its logarithm)
PAD_LOGIT = -1e4

#: ``metadata.json``'s format of a student cvmkd saved as a Hugging Face folder
PACKAGE_FORMAT = "huggingface"


def is_hf_folder(folder: Path) -> bool:
    """A folder saved by ``save_pretrained``: a ``config.json`` naming a ``model_type``, and not a
    cvmkd package of its own format (a ``metadata.json`` of another format)."""
    config = folder / "config.json"
    if not config.is_file():
        return False
    if (folder / "metadata.json").is_file():
        try:
            if json.loads((folder / "metadata.json").read_text("utf-8")).get("format") != PACKAGE_FORMAT:
                return False
        except (OSError, ValueError, AttributeError):
            return False
    try:
        return "model_type" in json.loads(config.read_text("utf-8"))
    except (OSError, ValueError):
        return False


def quiet_transformers() -> None:
    """No progress bars from ``transformers`` (loading and saving weights) in cvmkd's output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


class HfSeq2Seq(torch.nn.Module):
    """A seq2seq model of the ``transformers`` library, with the tokenizer of its folder."""

    #: how a model package holds it (see :func:`cvmkd_nmt.model.package.save_package`)
    package_format = PACKAGE_FORMAT
    #: what a student built from its teacher copied of it (``[student.model] init = "teacher"``)
    initialised: dict[str, Any] | None = None

    def __init__(self, model: Any, tokenizer: HfTokenizer, max_len: int = 512) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        config = model.config
        start = config.decoder_start_token_id
        self.decoder_start = int(start if start is not None else tokenizer.pad_id)
        positions = getattr(config, "max_position_embeddings", None) or max_len
        self.config = HfShape(
            vocab_size=int(config.vocab_size),
            max_len=int(min(positions, max_len)),
            pad_id=tokenizer.pad_id,
            bos_id=tokenizer.bos_id,
            eos_id=tokenizer.eos_id,
            architecture=str(getattr(config, "model_type", "")),
        )

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits (B, T, V); ``tgt_in`` starts with any start id (cvmkd's), which
        is replaced by the model's own decoder start token. With ``rows``, a (B, T) bool mask,
        the (N, V) logits of the positions it marks."""
        decoder_ids = tgt_in.clone()
        decoder_ids[:, 0] = self.decoder_start
        out = self.model(input_ids=src, attention_mask=src.ne(self.config.pad_id), decoder_input_ids=decoder_ids)
        logits = out.logits[..., : self.config.vocab_size]
        # pad is never a target: a student never learns to produce it, and its embedding row,
        # which Marian's decoder starts from, stays zero as Marian (and CTranslate2) expect
        if rows is not None:
            logits = logits[rows]
        return logits.index_fill(-1, torch.tensor([self.config.pad_id], device=logits.device), PAD_LOGIT)

    def _generate(self, src: torch.Tensor, beam_size: int, nbest: int, max_new: int, min_new: int = 0) -> Any:
        return self.model.generate(
            input_ids=src,
            attention_mask=src.ne(self.config.pad_id),
            num_beams=beam_size,
            num_return_sequences=nbest,
            do_sample=False,
            max_new_tokens=max_new,
            min_new_tokens=min_new,
            early_stopping=True if beam_size > 1 else False,
            pad_token_id=self.config.pad_id,
            eos_token_id=self.config.eos_id,
            decoder_start_token_id=self.decoder_start,
            suppress_tokens=[self.config.pad_id],  # never a target (see forward)
            # a multilingual model's first token is the target language's code
            **({"forced_bos_token_id": prefix[0]} if len(prefix := self.tokenizer.target_prefix) == 1 else {}),
        )

    def _strip(self, row: list[int]) -> list[int]:
        out = []
        for token in row[1:]:  # the decoder start token
            if token == self.config.eos_id:
                break
            if token != self.config.pad_id:
                out.append(token)
        return out

    def translate_texts(
        self,
        sources: list[str],
        *,
        beam_size: int = 1,
        batch_size: int = 32,
        nbest: int = 1,
        max_len_a: float = 1.5,
        max_len_b: int = 10,
        device: torch.device | str = "cpu",
    ) -> list[list[str]]:
        """The ``nbest`` best translations of each source (best first), in order, through cvmkd's
        one decoding loop with ``generate`` of transformers as the decoder."""
        from cvmkd_nmt.model.translate import decode_batches

        tok = self.tokenizer
        encoded = [ids[: self.config.max_len - 1] + [tok.eos_id] for ids in tok.encode(sources)]

        def decode(src: torch.Tensor, rows: list[int]) -> list[list[str]]:
            longest = max(len(encoded[i]) for i in rows)
            max_new = max(1, min(int(max_len_a * longest + max_len_b), self.config.max_len - 1))
            out = self._generate(src, max(beam_size, nbest), nbest, max_new).tolist()
            texts = tok.decode(self._strip(row) for row in out)
            return [texts[j * nbest : (j + 1) * nbest] for j in range(len(rows))]

        return decode_batches(self, encoded, tok.pad_id, batch_size, device, decode)

    def save_folder(self, directory: Path, half: bool = False) -> None:
        """The model as ``save_pretrained`` writes it, with its tokenizer's own files beside it,
        so that ``transformers`` (and CTranslate2's converter) load the folder as it is."""
        quiet_transformers()
        model = self.model
        if half:
            import copy

            model = copy.deepcopy(model).half()
        model.save_pretrained(str(directory), safe_serialization=True)
        self.tokenizer.save(directory, into=".")

    def timed_decode(self, src: torch.Tensor, steps: int) -> float:
        """Seconds to decode exactly ``steps`` tokens for every row of ``src`` (greedy)."""
        with torch.inference_mode():
            started = time.perf_counter()
            self._generate(src, 1, 1, steps, steps)
            return time.perf_counter() - started


def read_package_metadata(folder: Path) -> dict[str, Any]:
    """The ``metadata.json`` of a student cvmkd saved as a Hugging Face folder ({} for a folder
    of another origin), after checking every file against the sha256 it records."""
    from cvmkd_core.files import sha256_file

    path = folder / "metadata.json"
    if not path.is_file():
        return {}
    try:
        metadata = json.loads(path.read_text("utf-8"))
    except ValueError as exc:
        raise ModelError(f"model package {folder}: metadata.json is damaged ({exc})") from None
    for name, expected in (metadata.get("files_sha256") or {}).items():
        file = folder / name
        if not file.is_file():
            raise ModelError(f"model package {folder}: {name} is missing")
        if sha256_file(file) != expected:
            raise ModelError(
                f"model package {folder}: {name} does not match the sha256 recorded in metadata.json (edited or damaged)"
            )
    return metadata


#: what a Hugging Face folder's model is made of: every weight file and the configurations that
#: change what it computes or generates
IDENTITY_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
IDENTITY_CONFIGS = ("config.json", "generation_config.json")


def folder_identity(folder: Path) -> str:
    """One sha256 over every weight file (sharded or not, safetensors beside .bin included) and
    ``config.json`` and ``generation_config.json``, each by name: two folders share it only when
    their models are the same, so cached teacher outputs never pass from one to the other."""
    import hashlib

    from cvmkd_core.files import sha256_file

    files = sorted({f for pattern in IDENTITY_FILES for f in folder.glob(pattern)})
    files += [folder / name for name in IDENTITY_CONFIGS if (folder / name).is_file()]
    if not any(f.suffix in (".safetensors", ".bin") for f in files):
        raise ModelError(f"{folder}: no weight files (*.safetensors or *.bin)")
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


class HfLoader:
    """Loads a local Hugging Face seq2seq folder (``save_pretrained``), offline."""

    @staticmethod
    def recognizes(folder: Path) -> bool:
        return is_hf_folder(folder)

    @staticmethod
    def load(
        folder: Path, device: str | torch.device = "cpu", source_lang: str = "", target_lang: str = ""
    ) -> tuple[HfSeq2Seq, HfTokenizer, dict[str, Any]]:
        from transformers import AutoModelForSeq2SeqLM

        quiet_transformers()
        package = read_package_metadata(folder)
        try:
            model = AutoModelForSeq2SeqLM.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"{folder}: cannot load it as a Hugging Face seq2seq model ({exc})") from None
        start = model.config.decoder_start_token_id
        if package and (source_lang or target_lang):
            raise ModelError(f"{folder}: a student's package records its languages; give none")
        tokenizer = HfTokenizer(
            folder,
            vocab_size=int(model.config.vocab_size),
            decoder_start_id=start,
            source_lang=source_lang,
            target_lang=target_lang,
        )
        wrapped = HfSeq2Seq(model.float().eval(), tokenizer).to(device)
        if package:  # a student cvmkd saved: its metadata, and the files as they were written
            return wrapped, tokenizer, {**package, "architecture": wrapped.config.architecture}
        metadata = {
            "role": "teacher",
            "format": "huggingface",
            "architecture": wrapped.config.architecture,
            "weights_sha256": folder_identity(folder),
            "tokenizer_sha256": tokenizer.sha256,
            **({"languages": tokenizer.languages} if tokenizer.languages else {}),
        }
        return wrapped, tokenizer, metadata
