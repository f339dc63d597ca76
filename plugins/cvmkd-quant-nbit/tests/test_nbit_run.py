"""The nbit quantizers in a real (tiny) distillation run: each variant is measured, packaged,
loads for translation, and records its details."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from cvmkd_core.model.package import load_package
from cvmkd_core.quant import NbitLinear, QuantEmbedding
from cvmkd_core.session import open_session, run_session
from cvmkd_kd.translate import translate

WORDS = {"le": "the", "chat": "cat", "chien": "dog", "mange": "eats", "voit": "sees", "petit": "small",
         "grand": "big", "oiseau": "bird", "poisson": "fish", "un": "a"}

RECIPE = """
[run]
name = "tiny"
steps = 12
validate_every = 6
seed = 3
cache_dir = "cache"

[corpus]
name = "files"
train = "corpus.tsv"
valid_size = 8
test_size = 8

[tokenizer]
vocab_size = 40

[teacher]
steps = 10
validate_every = 10
batch_size = 16
learning_rate = 3e-3
warmup_steps = 2

[teacher.model]
name = "cvm"
preset = "tiny"

[student.model]
name = "cvm"
preset = "tiny"
d_model = 16
n_heads = 2

[distill]
name = "kd"
batch_size = 8
warmup_steps = 2
topk = 4

[validation]
metrics = ["bleu", "chrf"]
significance_samples = 0

[[quantize]]
name = "nbit"
bits = 4
group_size = 16
max_bleu_loss = 100.0
max_composite_loss = 1.0

[[quantize]]
name = "progressive"
max_bleu_loss = 100.0
max_composite_loss = 1.0

[[quantize]]
name = "target-ratio"
ratio = 0.3
max_bleu_loss = 100.0
max_composite_loss = 1.0

[[quantize]]
name = "nbit"
bits = 4
fallback_share = 0.5
max_rounds = 2
"""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    rng = random.Random(0)
    lines = []
    for _ in range(120):
        src = [rng.choice(list(WORDS)) for _ in range(rng.randint(2, 6))]
        lines.append(" ".join(src) + "\t" + " ".join(WORDS[w] for w in src))
    (tmp_path / "corpus.tsv").write_text("\n".join(lines) + "\n")
    (tmp_path / "recipe.toml").write_text(RECIPE)
    torch.set_num_threads(1)
    return tmp_path


def test_nbit_progressive_and_target_ratio_in_a_run(workdir: Path) -> None:
    summary, run_dir = run_session(open_session(workdir / "recipe.toml"))
    assert summary.status == "completed"
    report = json.loads((run_dir / "quantization.json").read_text())
    variants = {v["name"]: v for v in report["variants"]}
    assert list(variants) == ["nbit-0", "progressive", "target-ratio", "nbit-3"]

    nbit = variants["nbit-0"]
    assert nbit["scheme"] == "nbit-int4-g16" and nbit["accepted"] is True
    assert nbit["details"]["group_size"] == 16 and nbit["details"]["per_row_scales"] == []
    assert nbit["details"]["levels"] == {"4": len(nbit["details"]["layers"])}

    progressive = variants["progressive"]
    assert [s["bits"] for s in progressive["details"]["stages"]] == [16, 8, 4]
    assert all(s["verdict"] == "within budget" for s in progressive["details"]["stages"])
    assert progressive["details"]["kept_stage"] == 4 and progressive["scheme"] == "progressive-int4"

    target = variants["target-ratio"]
    details = target["details"]
    assert 0.95 * 0.3 <= details["achieved_ratio"] <= 0.3
    # the achieved ratio is the run's own parameter ratio
    assert target["parameter_ratio"] == pytest.approx(details["achieved_ratio"], abs=1e-4)
    assert details["sensitivity"]["sentences"] == 8 and details["sensitivity"]["positions"] > 0
    assert set(details["sensitivity"]["table"]) == set(details["layers"])

    # the default budget: the quantizer's own verdict is the run's
    judged = variants["nbit-3"]
    assert judged["accepted"] is judged["details"]["within_budget"]
    assert judged["details"]["evaluations"] == 1 + len(judged["details"]["rounds"])

    for variant in variants.values():
        package = Path(variant["package"])
        model, tokenizer, metadata = load_package(package)
        assert metadata["scheme"] == variant["scheme"]
        assert metadata["quantization"] == variant["details"]
        assert any(isinstance(m, NbitLinear) for m in model.modules())
        assert any(isinstance(m, QuantEmbedding) for m in model.modules())
        assert len(translate(model, tokenizer, ["le chat mange", "un petit oiseau"])) == 2
