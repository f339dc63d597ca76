"""A Hugging Face teacher from a local folder, without a hub: a tiny MarianMT with a SentencePiece
tokenizer trained in the test is saved with ``save_pretrained``, then distilled (word-level and
sequence-level KD) into a cvm student on its vocabulary, which is validated, packaged and
translated by ``cvmkd translate``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cvmkd_core.cli import main
from cvmkd_hf import HfLoader, is_hf_folder
from cvmkd_testing import write_tiny_corpus

RECIPE = """
[run]
name = "hf"
steps = 6
validate_every = 6
cache_dir = "cache"

[corpus]
name = "files"
train = "corpus.tsv"
valid_size = 8
test_size = 8

[teacher]
checkpoint = "marian"

[student.model]
name = "cvm"
preset = "tiny"

[distill]
name = "kd"
batch_size = 16
topk = 4
warmup_steps = 2

[validation]
metrics = ["bleu", "chrf"]
significance_samples = 0
"""


def tiny_marian(root: Path, folder: str = "marian") -> Path:
    """A randomly initialised MarianMT (d_model 32) with a joint SentencePiece vocabulary trained
    on the corpus, saved as ``transformers`` saves it."""
    import sentencepiece as spm
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    pairs = [line.split("\t") for line in (root / "corpus.tsv").read_text().splitlines()]
    (root / "text.txt").write_text("\n".join(side for pair in pairs for side in pair) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(root / "text.txt"),
        model_prefix=str(root / "spm"),
        vocab_size=40,
        pad_id=-1,
        bos_id=-1,
        eos_id=-1,
        unk_id=0,
        minloglevel=2,
        hard_vocab_limit=False,
    )
    vocab = {"</s>": 0, "<unk>": 1}
    for line in (root / "spm.vocab").read_text().splitlines():
        vocab.setdefault(line.split("\t")[0], len(vocab))
    vocab["<pad>"] = len(vocab)
    out = root / folder
    out.mkdir()
    for name in ("source.spm", "target.spm"):
        shutil.copyfile(root / "spm.model", out / name)
    (out / "vocab.json").write_text(json.dumps(vocab))
    MarianTokenizer(
        vocab=str(out / "vocab.json"), source_spm=str(out / "source.spm"), target_spm=str(out / "target.spm")
    ).save_pretrained(out)
    torch.manual_seed(0)
    config = MarianConfig(
        vocab_size=len(vocab),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=vocab["<pad>"],
        eos_token_id=0,
        decoder_start_token_id=vocab["<pad>"],
    )
    MarianMTModel(config).save_pretrained(out)
    return out


def tiny_t5(root: Path, folder: str = "t5") -> Path:
    """A randomly initialised T5 (d_model 32) with its own SentencePiece model (pad 0, end 1,
    unknown 2, as T5's), saved as ``transformers`` saves it."""
    import sentencepiece as spm
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    pairs = [line.split("\t") for line in (root / "corpus.tsv").read_text().splitlines()]
    (root / "text.txt").write_text("\n".join(side for pair in pairs for side in pair) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(root / "text.txt"),
        model_prefix=str(root / "t5spm"),
        vocab_size=40,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
        hard_vocab_limit=False,
    )
    out = root / folder
    tokenizer = T5Tokenizer(vocab_file=str(root / "t5spm.model"), extra_ids=0)
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    T5ForConditionalGeneration(config).save_pretrained(out)
    return out


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may come from a hub
    write_tiny_corpus(tmp_path)
    tiny_marian(tmp_path)
    tiny_t5(tmp_path)
    (tmp_path / "hf.toml").write_text(RECIPE)
    return tmp_path


def test_the_folder_loads_offline_with_its_tokenizer(workdir: Path) -> None:
    assert is_hf_folder(workdir / "marian")
    model, tokenizer, metadata = HfLoader.load(workdir / "marian")
    assert metadata["architecture"] == "marian" and metadata["format"] == "huggingface"
    # Marian starts decoding from pad, which cvm students keep for padding: they start from eos
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == (model.config.pad_id, 0, 0)
    ids = tokenizer.encode(["le chat"])[0]
    assert ids and tokenizer.eos_id not in ids
    assert tokenizer.decode([ids]) == ["le chat"]
    src = torch.tensor([ids + [tokenizer.eos_id]])
    logits = model(src, torch.tensor([[tokenizer.bos_id, ids[0]]]))
    assert logits.shape == (1, 2, model.config.vocab_size)
    (out,) = model.translate_texts(["le chat"], beam_size=2, nbest=2)
    assert len(out) == 2


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "teacher"), [("word", "marian"), ("sequence", "marian"), ("word", "t5")])
def test_a_cvm_student_distils_the_hugging_face_teacher(
    workdir: Path, kind: str, teacher: str, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ["--set", 'distill.sequence={targets = "teacher", beam_size = 2}'] if kind == "sequence" else []
    extra += ["--set", f"teacher.checkpoint={teacher}"]
    assert main(["run", "hf.toml", "--run-dir", "run", "--quiet", *extra]) == 0, capsys.readouterr().err
    summary = json.loads((workdir / "run" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert set(summary["evaluation"]["scores"]) >= {"student", "teacher"}
    meta = json.loads((workdir / "run" / "model" / "metadata.json").read_text())
    assert meta["teacher"]["source"] == "loaded" and meta["teacher"]["path"] == teacher
    package = workdir / "run" / "model"
    assert (package / "tokenizer-hf" / "tokenizer_config.json").is_file() and not (package / "tokenizer.model").exists()
    config = json.loads((package / "config.json").read_text())
    original = json.loads((workdir / teacher / "config.json").read_text())
    assert config["vocab_size"] == original["vocab_size"] and config["pad_id"] == original["pad_token_id"]

    (workdir / "in.txt").write_text("le chat\nun grand chien\n")
    capsys.readouterr()
    assert main(["translate", "--model", str(package), "-i", "in.txt"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["translate", "--model", teacher, "-i", "in.txt"]) == 0  # the teacher folder itself
    assert len(capsys.readouterr().out.splitlines()) == 2


def tiny_m2m100(root: Path, folder: str = "m2m100") -> Path:
    """A randomly initialised M2M100 (the architecture of M2M100 and NLLB, d_model 32) with a
    multilingual tokenizer: a SentencePiece model trained on the corpus, a ``__fr__``/``__en__``
    language code before each side's text."""
    import sentencepiece as spm
    from transformers import M2M100Config, M2M100ForConditionalGeneration, M2M100Tokenizer

    pairs = [line.split("\t") for line in (root / "corpus.tsv").read_text().splitlines()]
    (root / "text.txt").write_text("\n".join(side for pair in pairs for side in pair) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(root / "text.txt"),
        model_prefix=str(root / "m2mspm"),
        vocab_size=40,
        minloglevel=2,
        hard_vocab_limit=False,
    )
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for line in (root / "m2mspm.vocab").read_text().splitlines():
        vocab.setdefault(line.split("\t")[0], len(vocab))
    out = root / folder
    out.mkdir()
    (out / "vocab.json").write_text(json.dumps(vocab))
    shutil.copyfile(root / "m2mspm.model", out / "sentencepiece.bpe.model")
    tokenizer = M2M100Tokenizer(
        vocab_file=str(out / "vocab.json"), spm_file=str(out / "sentencepiece.bpe.model"), src_lang="en", tgt_lang="de"
    )
    # as the published M2M100 tokenizers: the language codes are special tokens
    tokenizer = M2M100Tokenizer(
        vocab_file=str(out / "vocab.json"),
        spm_file=str(out / "sentencepiece.bpe.model"),
        src_lang="en",
        tgt_lang="de",
        additional_special_tokens=list(tokenizer.lang_token_to_id),
    )
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = M2M100Config(
        # the tokenizer's pieces, its 100 language codes and the "made-up words" M2M100 pads with
        vocab_size=max(tokenizer.lang_token_to_id.values()) + 1 + tokenizer.num_madeup_words,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    M2M100ForConditionalGeneration(config).save_pretrained(out)
    return out


@pytest.mark.slow
def test_a_multilingual_teacher_is_given_its_language_pair(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cvmkd_hf import HfTokenizer

    tiny_m2m100(workdir)
    tokenizer = HfTokenizer(workdir / "m2m100", source_lang="fr", target_lang="en")
    # the codes M2M100 writes before each side's text, then the text; batching adds the end mark
    (source,) = tokenizer.encode(["le chat"])
    (target,) = tokenizer.encode_targets(["the cat"])
    assert tokenizer.id_to_piece(source[0]) == "__fr__" and tokenizer.id_to_piece(target[0]) == "__en__"
    assert tokenizer.decode([target]) == ["the cat"] and tokenizer.eos_id not in source + target
    assert HfTokenizer(workdir / "m2m100", source_lang="fr", target_lang="de").sha256 != tokenizer.sha256

    languages = [
        "--set",
        "teacher.checkpoint=m2m100",
        "--set",
        "teacher.source_lang=fr",
        "--set",
        "teacher.target_lang=en",
    ]
    sequence = ["--set", 'distill.sequence={targets = "teacher", beam_size = 2}']
    assert main(["run", "hf.toml", "--run-dir", "run", "--quiet", *languages, *sequence]) == 0, capsys.readouterr().err
    package = workdir / "run" / "model"
    assert json.loads((package / "tokenizer-hf" / "cvmkd-languages.json").read_text()) == {
        "source_lang": "fr",
        "target_lang": "en",
    }
    (workdir / "in.txt").write_text("le chat\nun grand chien\n")
    capsys.readouterr()
    assert main(["translate", "--model", str(package), "-i", "in.txt"]) == 0  # the package knows its pair
    assert len(capsys.readouterr().out.splitlines()) == 2
    pair = ["--source-lang", "fr", "--target-lang", "en"]
    assert main(["translate", "--model", "m2m100", "-i", "in.txt", *pair]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2

    # a multilingual teacher without its pair, an unknown code, codes for a one-pair tokenizer
    for args, message in (
        (["translate", "--model", "m2m100", "-i", "in.txt"], "is multilingual: give the language codes"),
        (["translate", "--model", "m2m100", "-i", "in.txt", "--source-lang", "xx", "--target-lang", "en"],
         "source_lang = 'xx' is not a language code"),
        (["translate", "--model", "marian", "-i", "in.txt", *pair], "translates one language pair"),
        (["translate", "--model", str(package), "-i", "in.txt", *pair], "not cvmkd packages"),
    ):  # fmt: skip
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_a_student_with_a_tokenizer_of_its_own_learns_from_the_teachers_translations(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    own = ["--set", "student.tokenizer=own", "--set", "tokenizer.vocab_size=30"]
    sequence = ["--set", 'distill.sequence={targets = "teacher", beam_size = 1}', "--set", 'distill.loss={name = "ce"}']
    assert main(["run", "hf.toml", "--run-dir", "run", "--quiet", *own, *sequence]) == 0, capsys.readouterr().err
    summary = json.loads((workdir / "run" / "summary.json").read_text())
    assert summary["extra"]["trainer"]["teacher"]["student_tokenizer"] == {"own": True, "vocab_size": 30}
    assert set(summary["evaluation"]["scores"]) >= {"student", "teacher"}
    package = workdir / "run" / "model"
    # its own SentencePiece model, not the teacher's tokenizer
    assert (package / "tokenizer.model").is_file() and not (package / "tokenizer-hf").exists()
    assert json.loads((package / "config.json").read_text())["vocab_size"] == 30
    (workdir / "in.txt").write_text("le chat\n")
    capsys.readouterr()
    assert main(["translate", "--model", str(package), "-i", "in.txt"]) == 0

    # word-level KD compares distributions over one vocabulary: refused in one line
    assert main(["run", "hf.toml", "--run-dir", "run2", "--quiet", *own]) == 2
    err = capsys.readouterr().err.strip()
    assert "word-level KD compares the teacher's and the student's distributions" in err
    assert len(err.splitlines()) == 1


def test_a_folders_identity_covers_every_weight_file_and_both_configurations(tmp_path: Path) -> None:
    from cvmkd_core.errors import ModelError
    from cvmkd_hf.model import folder_identity

    def folder(name: str, files: dict[str, str]) -> Path:
        path = tmp_path / name
        path.mkdir()
        for file, text in files.items():
            (path / file).write_text(text)
        return path

    sharded = {
        "model-00001-of-00002.safetensors": "a",
        "model-00002-of-00002.safetensors": "b",
        "model.safetensors.index.json": "{}",
        "config.json": "{}",
    }
    base = folder_identity(folder("base", sharded))
    assert base == folder_identity(folder("same", sharded))
    changed = [
        {**sharded, "model-00002-of-00002.safetensors": "B"},  # another second shard
        {**sharded, "pytorch_model.bin": "c"},  # .bin beside safetensors
        {**sharded, "config.json": '{"d_model": 8}'},
        {**sharded, "generation_config.json": '{"num_beams": 4}'},
    ]
    identities = [folder_identity(folder(f"other{i}", files)) for i, files in enumerate(changed)]
    assert base not in identities and len(set(identities)) == len(identities)
    with pytest.raises(ModelError, match="no weight files"):
        folder_identity(folder("empty", {"config.json": "{}"}))
