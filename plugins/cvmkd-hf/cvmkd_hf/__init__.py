"""cvmkd plugin: teachers from Hugging Face seq2seq folders (``save_pretrained``: MarianMT, T5,
BART...), loaded offline with ``local_files_only``, with their own tokenizers.

``[teacher] checkpoint = "path/to/folder"`` recognises such a folder (``config.json`` with a
``model_type``, no cvmkd ``metadata.json``); the teacher's tokenizer then governs the run: the
corpus is tokenised with it, validation detokenises with it, and the student is built for its
vocabulary. ``cvmkd translate --model path/to/folder`` translates with it. ``[student.model]
name = "hf"`` builds a smaller student of the teacher's own family, saved as a Hugging Face
folder. ``cvmkd export MODEL --format huggingface`` writes a cvm package as such a folder. See
docs/teachers.md.
"""

from __future__ import annotations

from typing import Any

from cvmkd_core.hookspecs import hookimpl
from cvmkd_hf.export import HuggingFaceExporter
from cvmkd_hf.model import HfLoader, HfSeq2Seq, is_hf_folder
from cvmkd_hf.student import HfStudent, HfStudentSpec
from cvmkd_hf.tokenizer import HfTokenizer


@hookimpl
def cvmkd_register(register: Any) -> None:
    register.loader("hf", HfLoader)
    register.model("hf", HfStudent, config=HfStudentSpec)
    register.exporter("huggingface", HuggingFaceExporter)


__all__ = ["HfLoader", "HfSeq2Seq", "HfStudent", "HfStudentSpec", "HfTokenizer", "is_hf_folder"]
