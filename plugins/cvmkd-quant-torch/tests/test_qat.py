"""Fake quantization for quantization-aware training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cvmkd_nmt.model.presets import preset
from cvmkd_nmt.model.transformer import CvmTransformer
from cvmkd_quant_torch import qat


def test_fake_quantized_weights_take_at_most_255_levels_per_row_and_pass_gradients() -> None:
    torch.manual_seed(0)
    weight = torch.randn(4, 300, requires_grad=True)
    quantized = qat.fake_quant_weight(weight)
    for row in quantized.detach():
        assert row.unique().numel() <= 255
    scale = weight.detach().abs().amax(dim=1, keepdim=True) / 127
    assert ((quantized - weight).abs() <= scale / 2 + 1e-6).all()
    quantized.sum().backward()
    assert torch.equal(weight.grad, torch.ones_like(weight))  # straight through


def test_fake_quantized_activations_stay_within_half_a_step() -> None:
    x = torch.linspace(-3.0, 5.0, 1000, requires_grad=True)
    y = qat.fake_quant_activation(x)
    step = 8.0 / 255
    assert (y - x).abs().max() <= step / 2 + 1e-5
    assert y.detach().unique().numel() <= 256
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_enable_and_disable_keep_parameters_and_state_dict_names() -> None:
    torch.manual_seed(0)
    model = CvmTransformer(preset("tiny"))
    params = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    src = torch.randint(4, 60, (2, 7))
    tgt = torch.randint(4, 60, (2, 5))
    with torch.no_grad():
        before = model.eval()(src, tgt)
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert qat.enable(model) == linears and qat.is_enabled(model)
    assert list(model.state_dict()) == keys
    assert all(p is params[name] for name, p in model.named_parameters())
    with torch.no_grad():
        faked = model(src, tgt)
    assert not torch.equal(faked, before)
    assert (faked - before).abs().max() < 0.5  # close, not equal
    assert qat.disable(model) == linears and not qat.is_enabled(model)
    with torch.no_grad():
        assert torch.equal(model(src, tgt), before)


def test_stacked_fake_quantized_projections_equal_the_layers_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = CvmTransformer(preset("tiny"))
    qat.enable(model)
    attention = model.decoder_layers[0].self_attn
    layers = [attention.q_proj, attention.k_proj, attention.v_proj]
    x = torch.randn(2, 5, model.config.d_model, requires_grad=True)
    separate = torch.cat([m(x) for m in layers], dim=-1)
    grads = torch.autograd.grad(separate.square().sum(), [x, *(m.weight for m in layers)])
    stacked = qat.FakeQuantLinear.stacked_function(layers)(x)
    assert torch.allclose(stacked, separate, atol=1e-6, rtol=0)
    for a, b in zip(torch.autograd.grad(stacked.square().sum(), [x, *(m.weight for m in layers)]), grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    # the model's attention takes the stacked path: the same logits as layers called one by one
    src, tgt = torch.randint(4, 60, (2, 7)), torch.randint(4, 60, (2, 5))
    model.eval()
    calls: list[int] = []
    attention.q_proj.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        fused = model(src, tgt)
        assert calls == []  # stacked: the query layer is not called as a module
        monkeypatch.setattr(qat.FakeQuantLinear, "stacked_function", None)  # one by one
        assert torch.allclose(model(src, tgt), fused, atol=1e-5)
        assert calls == [1]


def test_fake_quantization_rounds_bfloat16_inputs_in_float32() -> None:
    x = torch.linspace(-3.0, 5.0, 1000).bfloat16().requires_grad_()
    y = qat.fake_quant_activation(x)
    assert y.dtype == torch.bfloat16
    step = 8.0 / 255
    assert (y.float() - x.float()).abs().max() <= step / 2 + 0.02  # plus bfloat16's own rounding
    y.float().sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
