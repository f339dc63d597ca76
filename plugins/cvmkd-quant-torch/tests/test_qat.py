"""Fake quantization for quantization-aware training."""

from __future__ import annotations

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
