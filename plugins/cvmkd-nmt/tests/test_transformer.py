"""Tests of the cvm transformer's config, presets, masks, limits and bf16/int8 compatibility."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from cvmkd_core.errors import ModelError
from cvmkd_nmt.model import (
    PRESETS,
    CvmTransformer,
    ModelConfig,
    count_parameters,
    estimate_parameters,
    greedy_decode,
    preset,
)


def _tiny(**overrides: object) -> CvmTransformer:
    torch.manual_seed(0)
    return CvmTransformer(preset("tiny", **overrides)).eval()


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 64, (3, 9), generator=g)
    src[0, 6:] = 0
    src[1, 4:] = 0
    tgt = torch.randint(4, 64, (3, 7), generator=g)
    tgt[:, 0] = 1
    tgt[2, 5:] = 0
    return src, tgt


# -- config ---------------------------------------------------------------------------------


def test_config_round_trips_through_json() -> None:
    cfg = preset("student-cpu", dropout=0.3, tie_embeddings=False)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_dict(data) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"d_model": -1}, "ModelConfig.d_model must be > 0, got -1"),
        ({"n_encoder_layers": 0}, "ModelConfig.n_encoder_layers must be > 0, got 0"),
        ({"d_model": 30, "n_heads": 4}, "d_model must be divisible by n_heads"),
        ({"dropout": 1.5}, "ModelConfig.dropout must be in [0, 1), got 1.5"),
        ({"tie_embeddings": "yes"}, "ModelConfig.tie_embeddings must be true or false"),
        ({"n_heads": True}, "ModelConfig.n_heads must be an integer"),
        ({"activation": "swish"}, "ModelConfig.activation must be one of gelu, relu"),
        ({"eos_id": 64}, "ModelConfig.eos_id must be < vocab_size (64), got 64"),
        ({"bos_id": 0}, "pad_id must differ from bos_id and eos_id"),
        ({"eos_id": 0}, "pad_id must differ from bos_id and eos_id"),
    ],
)
def test_bad_config_raises_model_error(overrides: dict, message: str) -> None:
    with pytest.raises(ModelError) as err:
        preset("tiny", **overrides)
    assert message in str(err.value)


def test_from_dict_rejects_unknown_and_missing_keys() -> None:
    data = preset("tiny").to_dict()
    with pytest.raises(ModelError, match="unknown model config key.*d_modle"):
        ModelConfig.from_dict({**data, "d_modle": 3})
    del data["vocab_size"]
    with pytest.raises(ModelError, match="missing key.*vocab_size"):
        ModelConfig.from_dict(data)


def test_unknown_preset_lists_known_names() -> None:
    with pytest.raises(ModelError) as err:
        preset("teacher-huge")
    assert "'teacher-huge'" in str(err.value)
    for name in PRESETS:
        assert name in str(err.value)
    with pytest.raises(ModelError, match="unknown model config key"):
        preset("tiny", layers=3)


# -- presets ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "dims"),
    [
        ("teacher-base", (32000, 768, 12, 12, 12, 3072)),
        ("student-base", (32000, 512, 8, 6, 6, 2048)),
        ("teacher-cpu", (8000, 256, 4, 4, 4, 1024)),
        ("student-cpu", (8000, 160, 4, 3, 3, 768)),
        ("tiny", (64, 32, 2, 2, 2, 64)),
    ],
)
def test_preset_dimensions(name: str, dims: tuple[int, ...]) -> None:
    cfg = preset(name)
    got = (
        cfg.vocab_size,
        cfg.d_model,
        cfg.n_heads,
        cfg.n_encoder_layers,
        cfg.n_decoder_layers,
        cfg.d_ff,
    )
    assert got == dims
    assert (cfg.pad_id, cfg.bos_id, cfg.eos_id) == (0, 1, 2)
    assert cfg.tie_embeddings


def test_parameter_counts_and_size_ratios() -> None:
    # The estimate is exact (checked on built models, tied and untied), so the base
    # sizes need not be instantiated here.
    for cfg in (preset("tiny"), preset("tiny", tie_embeddings=False), preset("student-cpu")):
        assert count_parameters(CvmTransformer(cfg)) == estimate_parameters(cfg)
    teacher_cpu = estimate_parameters(preset("teacher-cpu"))
    student_cpu = estimate_parameters(preset("student-cpu"))
    assert 0.30 < student_cpu / teacher_cpu < 0.50
    assert 200e6 < estimate_parameters(preset("teacher-base")) < 240e6
    assert 55e6 < estimate_parameters(preset("student-base")) < 65e6


def test_tied_embeddings_share_one_matrix() -> None:
    model = _tiny()
    assert model.tgt_embed is model.src_embed
    assert model.output_proj.weight is model.src_embed.weight
    untied = _tiny(tie_embeddings=False)
    assert untied.output_proj.weight is not untied.src_embed.weight
    assert untied.tgt_embed is not untied.src_embed
    # max_len is a non-persistent buffer: it must not inflate checkpoints.
    assert "positions" not in model.state_dict()


def test_init_is_deterministic_under_manual_seed() -> None:
    a, b = _tiny().state_dict(), _tiny().state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- forward and masks ------------------------------------------------------------------------


def test_forward_shapes_and_encode() -> None:
    model = _tiny()
    src, tgt = _batch()
    logits = model(src, tgt)
    assert logits.shape == (3, 7, 64)
    assert torch.isfinite(logits).all()
    memory, pad_mask = model.encode(src)
    assert memory.shape == (3, 9, 32)
    assert torch.equal(pad_mask, src.eq(0))


def test_causal_mask_future_token_does_not_change_earlier_logits() -> None:
    model = _tiny()
    src, tgt = _batch()
    changed = tgt.clone()
    changed[:, 4] = (changed[:, 4] + 7) % 60 + 4
    a, b = model(src, tgt), model(src, changed)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_source_padding_does_not_change_outputs() -> None:
    model = _tiny()
    src, tgt = _batch()
    batched = model(src, tgt)
    for i in range(src.size(0)):
        n = int(src[i].ne(0).sum())
        alone = model(src[i : i + 1, :n], tgt[i : i + 1])
        torch.testing.assert_close(alone, batched[i : i + 1], rtol=1e-4, atol=1e-5)


def test_explicit_target_pad_mask_matches_causal_path() -> None:
    # A right-padded batch takes the is_causal path; adding one row with a pad before a
    # real token forces the explicit causal+pad mask, which must give the same logits.
    model = _tiny()
    src, tgt = _batch()
    fast = model(src, tgt)
    gap = torch.tensor([[1, 9, 0, 0, 11, 12, 0]])
    masked = model(torch.cat([src, src[:1]]), torch.cat([tgt, gap]))
    real = tgt.ne(0)  # outputs at pad positions are don't-care and may differ
    torch.testing.assert_close(masked[:3][real], fast[real])
    assert torch.isfinite(masked).all()


def test_inputs_longer_than_max_len_raise_model_error() -> None:
    model = _tiny(max_len=8)
    ok = torch.full((1, 8), 5)
    too_long = torch.full((1, 9), 5)
    model(ok, ok)
    with pytest.raises(ModelError, match="source has length 9, more than the model's max_len 8"):
        model(too_long, ok)
    with pytest.raises(ModelError, match="target has length 9"):
        model(ok, too_long)
    memory, pad_mask = model.encode(ok)
    cache = None
    for _ in range(8):
        _, cache = model.decode_step(torch.tensor([5]), memory, pad_mask, cache)
    with pytest.raises(ModelError, match="max_len is 8"):
        model.decode_step(torch.tensor([5]), memory, pad_mask, cache)


def test_out_of_vocabulary_ids_raise_model_error() -> None:
    model = _tiny()
    with pytest.raises(ModelError, match="outside \\[0, 64\\)"):
        model(torch.tensor([[5, 64]]), torch.tensor([[1]]))


def test_dropout_is_active_only_in_training() -> None:
    model = _tiny(dropout=0.5)
    src, tgt = _batch()
    model.train()
    assert not torch.equal(model(src, tgt), model(src, tgt))
    model.eval()
    assert torch.equal(model(src, tgt), model(src, tgt))


# -- bf16 and int8 ----------------------------------------------------------------------------


def test_bf16_autocast_forward_backward_and_decode() -> None:
    model = _tiny()
    src, tgt = _batch()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(src, tgt)
        assert logits.shape == (3, 7, 64)
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=0)
    loss.backward()
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = greedy_decode(model, src, max_len_b=5)
    assert len(out) == 3 and all(isinstance(t, int) for row in out for t in row)
    assert model.training


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_dynamic_int8_quantization_runs() -> None:
    model = _tiny()
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert type(quantized.output_proj) is not nn.Linear
    src, tgt = _batch()
    assert quantized(src, tgt).shape == (3, 7, 64)
    out = greedy_decode(quantized, src, max_len_b=5)
    assert len(out) == 3 and all(0 < len(row) <= 15 for row in out)


# -- training speed paths: dropout, attention with dropout, logits of chosen rows -------------


@pytest.fixture(params=["C kernel", "torch"])
def dropout_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Dropout through cvmkd's C kernel, and through torch's operations (where no compiler is)."""
    from cvmkd_nmt import kernels
    from cvmkd_nmt.model import transformer

    if request.param == "torch":
        monkeypatch.setattr(transformer, "dropout_kernel", lambda x: None)
    elif not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler on this machine: dropout runs through torch")
    else:
        assert kernels.dropout_kernel(torch.ones(1)) is not None, "this machine has a C compiler: the kernel must build"
    return str(request.param)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_keeps_the_expectation_and_its_gradient_uses_the_same_mask(
    dropout_path: str, dtype: torch.dtype
) -> None:
    from cvmkd_nmt.model.transformer import dropout

    torch.manual_seed(0)
    x = torch.ones(400, 500, dtype=dtype, requires_grad=True)
    y = dropout(x, 0.1, True)
    assert y.dtype == dtype
    dropped = (y == 0).float()
    assert 0.095 < float(dropped.mean()) < 0.105
    # neighbours are independent: both dropped about p * p of the time (and per column, per row)
    assert 0.008 < float((dropped[:, 1:] * dropped[:, :-1]).mean()) < 0.012
    assert 0.008 < float((dropped[1:] * dropped[:-1]).mean()) < 0.012
    assert abs(float(y.detach().float().mean()) - 1.0) < 0.01
    kept = y[y != 0]
    assert torch.allclose(kept.float(), torch.full_like(kept.float(), 65536 / (65536 - round(0.1 * 65536))), rtol=4e-3)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x * scale)/dx = scale: zero exactly where dropped
    assert dropout(x, 0.1, False) is x and dropout(x, 0.0, True) is x
    assert float(dropout(x, 1.0, True).detach().abs().sum()) == 0.0


def test_dropout_masks_differ_between_calls_and_follow_the_seed(dropout_path: str) -> None:
    from cvmkd_nmt.model.transformer import dropout

    x = torch.ones(64, 64)
    torch.manual_seed(3)
    a, b = dropout(x, 0.5, True), dropout(x, 0.5, True)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.5, True), a) and not torch.equal(a, b)
    # a view that is not contiguous is dropped as its values are
    t = torch.arange(1.0, 4097.0).view(64, 64).t()
    torch.manual_seed(4)
    out = dropout(t, 0.5, True)
    assert torch.equal(out[out != 0], (t * 2)[out != 0]) and 0.4 < float((out == 0).float().mean()) < 0.6


def test_training_attention_with_dropout_computes_what_sdpa_computes() -> None:
    # a dropout so small that no weight is dropped: the written-out training path must give
    # the outputs of scaled_dot_product_attention, with causal, padded and plain attention
    model = _tiny()
    src, tgt = _batch()
    expected = model(src, tgt)
    model.train()
    for module in model.modules():
        if hasattr(module, "n_heads"):
            module.dropout = 1e-9
        elif hasattr(module, "p"):
            module.p = 0.0
    assert torch.allclose(model(src, tgt), expected, atol=1e-5)


def test_logits_of_chosen_rows_equal_those_of_the_full_pass() -> None:
    model = _tiny()
    src, tgt = _batch()
    rows = tgt.ne(0)
    assert torch.allclose(model(src, tgt, rows=rows), model(src, tgt)[rows], atol=1e-6)
    assert model(src, tgt, rows=rows).shape == (int(rows.sum()), model.config.vocab_size)


def test_stacked_projections_equal_the_layers_one_by_one() -> None:
    # plain nn.Linear projections run as one product with stacked weights; any other layer
    # (quantized, fake-quantized) one by one: both must give the same attention inputs
    class Separate(nn.Linear):
        pass

    model = _tiny()
    attention = model.encoder_layers[0].self_attn
    x = torch.randn(2, 5, model.config.d_model)
    stacked = attention.project_qkv(x)
    for name in ("q_proj", "k_proj", "v_proj"):
        layer = getattr(attention, name)
        separate = Separate(layer.in_features, layer.out_features)
        separate.load_state_dict(layer.state_dict())
        setattr(attention, name, separate)
    one_by_one = attention.project_qkv(x)
    for a, b in zip(stacked, one_by_one, strict=True):
        assert a.shape == b.shape == (2, model.config.n_heads, 5, model.config.d_model // model.config.n_heads)
        assert torch.allclose(a, b, atol=1e-6)


def test_decoding_after_a_fused_optimizer_step_uses_the_updated_weights() -> None:
    # fused AdamW writes parameters without bumping their version counters: nothing derived
    # from the weights may outlive a training step
    model = _tiny(dropout=0.1)
    src, tgt = _batch()
    with torch.inference_mode():
        greedy_decode(model, src)  # decoding before training, as a validation does
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    model.train()
    for _ in range(3):
        model(src, tgt).logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    fresh = CvmTransformer(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.inference_mode():
        assert torch.equal(model(src, tgt), fresh(src, tgt))
        assert greedy_decode(model, src) == greedy_decode(fresh, src)


def _step_logits(model: CvmTransformer, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits of ``tgt`` decoded one position at a time through the cache."""
    with torch.inference_mode():
        memory, pad = model.encode(src)
        cache, out = None, []
        for t in range(tgt.size(1)):
            logits, cache = model.decode_step(tgt[:, t], memory, pad, cache)
            out.append(logits)
    return torch.stack(out, dim=1)


def test_eval_decoding_step_equals_the_full_pass_at_every_position() -> None:
    # eval-mode steps run through DecoderLayer.step (functions, one stacked query/key/value
    # product, 2-D rows); the full pass through the modules. float64: no rounding excuse.
    model = _tiny().double()
    src, tgt = _batch()
    tgt = tgt.masked_fill(tgt.eq(0), 5)  # decoder inputs of a cache are pad-free
    with torch.inference_mode():
        full = model(src, tgt)
    steps = _step_logits(model, src, tgt)
    assert steps.shape == full.shape
    assert torch.allclose(steps, full, atol=1e-10, rtol=0)


def test_step_functions_leave_other_modules_as_they_are() -> None:
    class Custom(nn.Linear):
        pass

    model = _tiny().double()
    src, tgt = _batch()
    tgt = tgt.masked_fill(tgt.eq(0), 5)
    before = _step_logits(model, src, tgt)
    layer = model.decoder_layers[1]
    calls = []
    for owner, name in ((layer.self_attn, "k_proj"), (layer.ff, "fc2")):
        old = getattr(owner, name)
        new = Custom(old.in_features, old.out_features).double()
        new.load_state_dict(old.state_dict())
        new.register_forward_hook(lambda *args, name=name: calls.append(name))
        setattr(owner, name, new)
    after = _step_logits(model, src, tgt)
    assert torch.allclose(before, after, atol=1e-10, rtol=0)
    assert calls.count("k_proj") == calls.count("fc2") == tgt.size(1)  # called as modules, every step


def test_training_mode_decoding_step_keeps_dropout() -> None:
    model = _tiny(dropout=0.5).double()
    src, tgt = _batch()
    tgt = tgt.masked_fill(tgt.eq(0), 5)
    evaluated = _step_logits(model, src, tgt)
    model.train()
    torch.manual_seed(1)
    assert not torch.allclose(_step_logits(model, src, tgt), evaluated)
    model.eval()
    assert torch.equal(_step_logits(model, src, tgt), evaluated)
