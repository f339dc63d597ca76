"""Tests of the word-level KD loss: reduction, temperature scaling, masking, precision, top-k."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from cvmkd_core.config import structure
from cvmkd_core.errors import ModelError, RecipeError
from cvmkd_kd import loss as loss_module
from cvmkd_kd.loss import KDConfig, compiled_kernels, kd_loss, label_smoothed_ce, resolve_compile

PAD = 0


def _batch(b: int = 2, t: int = 3, v: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(b, t, v, generator=g) * 2
    zt = torch.randn(b, t, v, generator=g) * 2
    y = torch.randint(1, v, (b, t), generator=g)
    return zs, zt, y


def _plain_kl(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, temp: float) -> torch.Tensor:
    """KL(p_t || p_s) at temperature ``temp``, summed over vocab and non-pad tokens, / tokens."""
    mask = y != PAD
    logp_s = F.log_softmax(zs[mask] / temp, -1)
    logp_t = F.log_softmax(zt[mask] / temp, -1)
    return F.kl_div(logp_s, logp_t, reduction="sum", log_target=True) / mask.sum()


def _softmax(row: list[float], temp: float) -> list[float]:
    m = max(row)
    e = [math.exp((x - m) / temp) for x in row]
    s = sum(e)
    return [x / s for x in e]


def test_reduction_matches_hand_computation() -> None:
    zs, zt, y = _batch(2, 3, 5)
    y[1, 2] = PAD  # 5 real tokens
    cfg = KDConfig(temperature=2.0, alpha=0.7, beta=0.3)

    kl_total, ce_total, n = 0.0, 0.0, 0
    for b in range(2):
        for t in range(3):
            if int(y[b, t]) == PAD:
                continue
            n += 1
            ps = _softmax(zs[b, t].tolist(), 2.0)
            pt = _softmax(zt[b, t].tolist(), 2.0)
            kl_total += sum(pt[v] * (math.log(pt[v]) - math.log(ps[v])) for v in range(5))
            ce_total += -math.log(_softmax(zs[b, t].tolist(), 1.0)[int(y[b, t])])
    kl, ce = kl_total / n, ce_total / n
    expected = 0.7 * 2.0**2 * kl + 0.3 * ce

    out = kd_loss(zs, y, PAD, zt, config=cfg)
    assert out.n_tokens == 5
    assert float(out.kd) == pytest.approx(kl, rel=1e-5)
    assert float(out.ce) == pytest.approx(ce, rel=1e-5)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("temp", [1.0, 2.0, 6.0])
def test_temperature_squared_factor(temp: float) -> None:
    zs, zt, y = _batch(3, 4, 7, seed=1)
    zs.requires_grad_(True)
    out = kd_loss(zs, y, PAD, zt, config=KDConfig(temperature=temp, alpha=1.0, beta=0.0))
    (g_loss,) = torch.autograd.grad(out.loss, zs)

    zs2 = zs.detach().clone().requires_grad_(True)
    plain = _plain_kl(zs2, zt, y, temp)
    (g_plain,) = torch.autograd.grad(plain, zs2)

    torch.testing.assert_close(out.loss, temp**2 * plain)
    torch.testing.assert_close(g_loss, temp**2 * g_plain)


def test_padding_positions_are_ignored() -> None:
    zs, zt, y = _batch(2, 4, 6, seed=2)
    y[0, 3] = PAD
    y[1, 2:] = PAD
    cfg = KDConfig(temperature=3.0, alpha=0.6, beta=0.4, label_smoothing=0.1)
    pad = y == PAD

    zs_a = zs.clone().requires_grad_(True)
    out_a = kd_loss(zs_a, y, PAD, zt, config=cfg)
    out_a.loss.backward()

    zs_b = zs.clone()
    zs_b[pad] = torch.randn(int(pad.sum()), 6) * 50
    zs_b[1, 3, 0] = float("inf")  # not even inf/NaN at a pad position may leak in
    zs_b[0, 3, 1] = float("nan")
    zt_b = zt.clone()
    zt_b[pad] = torch.randn(int(pad.sum()), 6) * 50
    zs_b.requires_grad_(True)
    out_b = kd_loss(zs_b, y, PAD, zt_b, config=cfg)
    out_b.loss.backward()

    torch.testing.assert_close(out_a.loss, out_b.loss)
    torch.testing.assert_close(zs_a.grad, zs_b.grad)
    assert torch.all(zs_b.grad[pad] == 0)

    # Same as the loss over the real tokens alone, packed into one unpadded row.
    real = ~pad
    out_c = kd_loss(zs[real][None], y[real][None], PAD, zt[real][None], config=cfg)
    assert out_c.n_tokens == out_a.n_tokens == 5
    torch.testing.assert_close(out_a.loss, out_c.loss)
    torch.testing.assert_close(out_a.token_accuracy, out_c.token_accuracy)
    torch.testing.assert_close(out_a.teacher_agreement, out_c.teacher_agreement)


@pytest.mark.parametrize("with_teacher", [True, False])
def test_alpha_zero_gradient_is_beta_times_cross_entropy(with_teacher: bool) -> None:
    zs, zt, y = _batch(2, 5, 9, seed=3)
    y[1, 3:] = PAD
    beta = 0.35
    cfg = KDConfig(temperature=4.0, alpha=0.0, beta=beta)
    zs1 = zs.clone().requires_grad_(True)
    out = kd_loss(zs1, y, PAD, zt if with_teacher else None, config=cfg)
    out.loss.backward()

    zs2 = zs.clone().requires_grad_(True)
    ref = F.cross_entropy(zs2.reshape(-1, 9), y.reshape(-1), ignore_index=PAD)
    ref.backward()
    torch.testing.assert_close(zs1.grad, beta * zs2.grad)
    torch.testing.assert_close(out.loss.detach(), beta * ref.detach())
    if with_teacher:  # still logged
        assert float(out.kd) > 0 and out.teacher_agreement is not None
    else:
        assert float(out.kd) == 0 and out.teacher_agreement is None


def test_label_smoothed_ce_matches_torch() -> None:
    zs, _, y = _batch(3, 4, 11, seed=4)
    y[2, 1:] = PAD
    for eps in (0.0, 0.1, 0.5):
        ours = label_smoothed_ce(zs, y, PAD, eps)
        ref = F.cross_entropy(zs.reshape(-1, 11), y.reshape(-1), ignore_index=PAD, label_smoothing=eps)
        torch.testing.assert_close(ours, ref)
    with pytest.raises(ValueError, match=r"epsilon must be in \[0, 1\), got 1.0"):
        label_smoothed_ce(zs, y, PAD, 1.0)
    # kd_loss's CE term uses the same smoothing.
    out = kd_loss(zs, y, PAD, config=KDConfig(alpha=0.0, beta=1.0, label_smoothing=0.1))
    torch.testing.assert_close(out.loss, label_smoothed_ce(zs, y, PAD, 0.1))


def test_vocabulary_mismatch_raises_model_error() -> None:
    y = torch.ones(1, 2, dtype=torch.long)
    zs = torch.randn(1, 2, 6000)
    zt = torch.randn(1, 2, 8000)
    msg = "teacher vocabulary (8000) differs from the student's (6000): distil with the teacher's tokenizer"
    with pytest.raises(ModelError) as err:
        kd_loss(zs, y, PAD, zt, config=KDConfig())
    assert str(err.value) == msg

    ids = torch.tensor([[[7999, 3]] * 2])
    lp = torch.log(torch.tensor([[[0.6, 0.4]] * 2]))
    with pytest.raises(
        ModelError,
        match=r"teacher vocabulary \(at least 8000 ids\) differs from the student's \(6000\)",
    ):
        kd_loss(zs, y, PAD, teacher_topk=(lp, ids), config=KDConfig())


def test_bf16_logits_match_fp32() -> None:
    zs, zt, y = _batch(4, 6, 50, seed=5)
    y[0, 4:] = PAD
    cfg = KDConfig(temperature=2.0, alpha=0.5, beta=0.5)
    ref = kd_loss(zs, y, PAD, zt, config=cfg)
    zs16 = zs.bfloat16().requires_grad_(True)
    out = kd_loss(zs16, y, PAD, zt.bfloat16(), config=cfg)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-2, atol=1e-3)
    out.loss.backward()
    assert zs16.grad.dtype == torch.bfloat16 and torch.isfinite(zs16.grad.float()).all()
    # And under CPU autocast, as the trainer may run it.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac = kd_loss(zs16, y, PAD, zt.bfloat16(), config=cfg)
    assert out_ac.loss.dtype == torch.float32
    torch.testing.assert_close(out_ac.loss, out.loss)


def test_topk_with_k_equal_vocab_equals_full() -> None:
    zs, zt, y = _batch(2, 4, 13, seed=6)
    y[1, 3] = PAD
    cfg = KDConfig(temperature=3.0, alpha=0.8, beta=0.2)
    zs_full = zs.clone().requires_grad_(True)
    full = kd_loss(zs_full, y, PAD, zt, config=cfg)
    full.loss.backward()

    lp, ids = F.log_softmax(zt, -1).topk(13, dim=-1)  # every id, in teacher-rank order
    zs_k = zs.clone().requires_grad_(True)
    topk = kd_loss(zs_k, y, PAD, teacher_topk=(lp, ids), config=cfg)
    topk.loss.backward()

    torch.testing.assert_close(topk.loss, full.loss)
    torch.testing.assert_close(topk.kd, full.kd)
    torch.testing.assert_close(zs_k.grad, zs_full.grad)
    torch.testing.assert_close(topk.teacher_agreement, full.teacher_agreement)


def test_topk_approximation_is_non_negative_and_close_for_peaked_teacher() -> None:
    zs, zt, y = _batch(2, 4, 40, seed=7)
    zt[..., :3] += 12  # nearly all teacher mass on ids 0..2
    cfg = KDConfig(temperature=1.0, alpha=1.0, beta=0.0)
    full = kd_loss(zs, y, PAD, zt, config=cfg)
    lp, ids = F.log_softmax(zt, -1).topk(4, dim=-1)
    approx = kd_loss(zs, y, PAD, teacher_topk=(lp, ids), config=cfg)
    assert float(approx.kd) >= 0
    assert float(approx.kd) == pytest.approx(float(full.kd), rel=1e-2)


def test_diagnostics() -> None:
    v = 4
    y = torch.tensor([[1, 2, 3, PAD]])
    zs = torch.full((1, 4, v), -5.0)
    zt = torch.full((1, 4, v), -5.0)
    for t, (s_arg, t_arg) in enumerate([(1, 1), (2, 3), (1, 3), (0, 0)]):
        zs[0, t, s_arg] = 5.0
        zt[0, t, t_arg] = 5.0
    out = kd_loss(zs, y, PAD, zt, config=KDConfig())
    # Student right at positions 0 and 1; agrees with the teacher at 0 only (3 is pad).
    assert float(out.token_accuracy) == pytest.approx(2 / 3)
    assert float(out.teacher_agreement) == pytest.approx(1 / 3)
    lp, ids = F.log_softmax(zt, -1).topk(2, dim=-1)
    out_k = kd_loss(zs, y, PAD, teacher_topk=(lp, ids), config=KDConfig())
    assert float(out_k.teacher_agreement) == pytest.approx(1 / 3)
    assert not out.kd.requires_grad and not out.ce.requires_grad


def test_all_pad_batch_gives_zero_not_nan() -> None:
    zs, zt, _ = _batch(2, 3, 5)
    y = torch.zeros(2, 3, dtype=torch.long)
    zs.requires_grad_(True)
    out = kd_loss(zs, y, PAD, zt, config=KDConfig())
    assert out.n_tokens == 0 and out.loss.item() == 0.0
    out.loss.backward()
    assert torch.all(zs.grad == 0)


def test_teacher_argument_errors() -> None:
    zs, zt, y = _batch()
    lp, ids = F.log_softmax(zt, -1).topk(2, dim=-1)
    with pytest.raises(ValueError, match="not both"):
        kd_loss(zs, y, PAD, zt, teacher_topk=(lp, ids), config=KDConfig())
    with pytest.raises(ValueError, match="needs a teacher"):
        kd_loss(zs, y, PAD, config=KDConfig())
    with pytest.raises(ValueError, match="do not match targets"):
        kd_loss(zs, y, PAD, zt[:, :2], config=KDConfig())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": -1.0}, "distill.loss.temperature: must be > 0, got -1.0"),
        ({"temperature": 0}, "distill.loss.temperature: must be > 0, got 0.0"),
        ({"alpha": -0.5}, "distill.loss.alpha: must be >= 0, got -0.5"),
        ({"beta": -2.0}, "distill.loss.beta: must be >= 0, got -2.0"),
        (
            {"alpha": 0.0, "beta": 0.0},
            "distill.loss: alpha and beta must not both be zero, got alpha=0.0, beta=0.0",
        ),
        ({"label_smoothing": 1.0}, "distill.loss.label_smoothing: must be in [0.0, 1.0), got 1.0"),
        ({"label_smoothing": -0.1}, "distill.loss.label_smoothing: must be in [0.0, 1.0), got -0.1"),
        ({"temperature": float("nan")}, "distill.loss.temperature: must be > 0, got nan"),
        ({"alpha": True}, "distill.loss.alpha: expected a number, got boolean true"),
        ({"temperature": "6"}, "distill.loss.temperature: expected a number, got string '6'"),
    ],
)
def test_config_validation_messages(options: dict[str, float], message: str) -> None:
    """The recipe section [distill.loss] is structured by KDConfig; each mistake names its path."""
    with pytest.raises(RecipeError) as err:
        structure(options, KDConfig, "distill.loss")
    assert err.value.problems == [message]


def test_config_defaults_and_frozen() -> None:
    cfg = KDConfig()
    assert (cfg.temperature, cfg.alpha, cfg.beta, cfg.label_smoothing) == (6.0, 0.8, 0.2, 0.0)
    with pytest.raises(AttributeError):
        cfg.alpha = 0.5  # type: ignore[misc]


def _uniform_tail_teacher(n: int, vocab: int, k: int, seed: int = 0) -> torch.Tensor:
    """Teacher logits whose top-k are distinct and whose other tokens all share one logit."""
    g = torch.Generator().manual_seed(seed)
    z = torch.full((n, vocab), -1.0)
    for row in range(n):
        ids = torch.randperm(vocab, generator=g)[:k]
        z[row, ids] = torch.rand(k, generator=g) * 4 + 1.0
    return z


@pytest.mark.parametrize("temperature", [1.0, 2.0, 6.0])
def test_bucket_topk_is_exact_when_both_tails_are_uniform(temperature: float) -> None:
    vocab, k = 12, 3
    z_t = _uniform_tail_teacher(5, vocab, k).view(1, 5, vocab)
    tail = z_t == -1.0
    z_s = torch.randn(1, 5, vocab, generator=torch.Generator().manual_seed(1))
    z_s = torch.where(tail, torch.full_like(z_s, 0.3), z_s)  # the student's tail is even too
    y = torch.randint(1, vocab, (1, 5), generator=torch.Generator().manual_seed(2))
    cfg = KDConfig(temperature=temperature, alpha=1.0, beta=0.0)
    full = kd_loss(z_s, y, PAD, z_t, config=cfg)
    lp, ids = F.log_softmax(z_t, -1).topk(k, dim=-1)
    bucket = kd_loss(z_s, y, PAD, teacher_topk=(lp, ids), config=cfg)
    assert float(bucket.kd) == pytest.approx(float(full.kd), rel=1e-5, abs=1e-6)


def test_bucket_topk_is_a_lower_bound_of_the_full_kl_and_renormalize_differs() -> None:
    vocab, k = 20, 4
    g = torch.Generator().manual_seed(3)
    z_t = torch.randn(2, 6, vocab, generator=g) * 3
    z_s = torch.randn(2, 6, vocab, generator=g)
    y = torch.randint(1, vocab, (2, 6), generator=g)
    lp, ids = F.log_softmax(z_t, -1).topk(k, dim=-1)
    for temperature in (1.0, 6.0):
        full = kd_loss(z_s, y, PAD, z_t, config=KDConfig(temperature=temperature))
        bucket = kd_loss(z_s, y, PAD, teacher_topk=(lp, ids), config=KDConfig(temperature=temperature))
        renorm = kd_loss(
            z_s, y, PAD, teacher_topk=(lp, ids), config=KDConfig(temperature=temperature, topk_tail="renormalize")
        )
        assert 0 <= float(bucket.kd) <= float(full.kd) + 1e-6
        assert float(renorm.kd) != pytest.approx(float(bucket.kd))


def test_bucket_topk_gradient_flows_to_tail_logits() -> None:
    vocab, k = 10, 2
    z_t = _uniform_tail_teacher(4, vocab, k).view(1, 4, vocab)
    lp, ids = F.log_softmax(z_t, -1).topk(k, dim=-1)
    z_s = torch.zeros(1, 4, vocab, requires_grad=True)
    y = torch.ones(1, 4, dtype=torch.long)
    kd_loss(z_s, y, PAD, teacher_topk=(lp, ids), config=KDConfig(temperature=6.0, alpha=1.0, beta=0.0)).loss.backward()
    tail_mask = torch.ones(1, 4, vocab, dtype=torch.bool).scatter(-1, ids, False)
    assert z_s.grad is not None and z_s.grad[tail_mask].abs().sum() > 0


def _topk(zt: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    lp, ids = F.log_softmax(zt, -1).topk(k, dim=-1)
    return lp, ids


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize(
    ("alpha", "beta", "teacher"), [(0.0, 1.0, False), (0.8, 0.2, True), (0.0, 1.0, True), (1.0, 0.0, True)]
)
def test_fused_loss_equals_autograd_in_value_and_gradient(
    smoothing: float, alpha: float, beta: float, teacher: bool
) -> None:
    zs, zt, y = _batch(b=3, t=5, v=40, seed=3)
    y[0, 3:] = PAD
    y[2, 1:] = PAD
    config = KDConfig(temperature=6.0, alpha=alpha, beta=beta, label_smoothing=smoothing)
    topk = _topk(zt, 8) if teacher else None
    results = []
    for fused in (True, False):
        z = zs.clone().requires_grad_()
        out = kd_loss(z, y, PAD, teacher_topk=topk, config=config, fused=fused)
        out.loss.backward()
        results.append((out, z.grad))
    (a, grad_a), (b, grad_b) = results
    for name in ("loss", "kd", "ce", "token_accuracy"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-6), name
    assert (a.teacher_agreement is None) == (b.teacher_agreement is None)
    if teacher:
        assert torch.allclose(a.teacher_agreement, b.teacher_agreement)
    assert torch.allclose(grad_a, grad_b, atol=1e-7), (grad_a - grad_b).abs().max()
    assert float(grad_a[2, 1:].abs().sum()) == 0.0  # pad positions get no gradient


def test_fused_loss_on_rows_equals_the_padded_batch() -> None:
    zs, zt, y = _batch(b=2, t=6, v=30, seed=4)
    y[1, 4:] = PAD
    mask = y != PAD
    config = KDConfig(label_smoothing=0.1)
    lp, ids = _topk(zt, 5)
    full = zs.clone().requires_grad_()
    out_full = kd_loss(full, y, PAD, teacher_topk=(lp, ids), config=config)
    out_full.loss.backward()
    rows = zs[mask].clone().requires_grad_()
    out_rows = kd_loss(rows, y[mask], PAD, teacher_topk=(lp[mask], ids[mask]), config=config)
    out_rows.loss.backward()
    assert torch.allclose(out_full.loss, out_rows.loss)
    assert out_full.n_tokens == out_rows.n_tokens == int(mask.sum())
    assert torch.allclose(full.grad[mask], rows.grad, atol=1e-7)


def test_fused_loss_gradient_where_the_rest_mass_is_clamped() -> None:
    # a student and a teacher that put (almost) all their mass on the top-k: the clamp of the
    # rest's mass decides the gradient, and the fused one must agree with autograd's
    zs = torch.full((1, 2, 12), -40.0)
    zs[..., :3] = torch.tensor([8.0, 7.0, 6.0])
    zt = zs.clone()
    y = torch.tensor([[1, 2]])
    config = KDConfig(temperature=1.0, alpha=1.0, beta=0.5)
    grads = []
    for fused in (True, False):
        z = zs.clone().requires_grad_()
        kd_loss(z, y, PAD, teacher_topk=_topk(zt, 3), config=config, fused=fused).loss.backward()
        grads.append(z.grad)
    assert torch.isfinite(grads[0]).all()
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_fused_loss_with_bf16_logits_returns_a_bf16_gradient() -> None:
    zs, zt, y = _batch(b=2, t=4, v=50, seed=5)
    config = KDConfig(label_smoothing=0.1)
    grads = []
    for fused in (True, False):
        z = zs.bfloat16().requires_grad_()
        kd_loss(z, y, PAD, teacher_topk=_topk(zt, 6), config=config, fused=fused).loss.backward()
        grads.append(z.grad)
    assert grads[0].dtype == torch.bfloat16
    assert torch.allclose(grads[0].float(), grads[1].float(), atol=1e-3)


# --- the compiled vocabulary passes ------------------------------------------------------------

CPU = torch.device("cpu")


def _loss_and_grad(z0: torch.Tensor, y: torch.Tensor, topk: Any, config: KDConfig) -> tuple[Any, torch.Tensor]:
    z = z0.clone().requires_grad_()
    out = kd_loss(z, y, PAD, teacher_topk=topk, config=config)
    out.loss.backward()
    assert z.grad is not None
    return out, z.grad


@pytest.mark.skipif(
    loss_module.cxx_compiler() is None, reason="no C++ compiler: torch.compile cannot build CPU kernels"
)
def test_compiled_loss_equals_the_eager_one() -> None:
    zs, zt, y = _batch(b=3, t=7, v=60, seed=6)
    y[0, 4:] = PAD
    cases = [  # (logits' dtype, teacher top-k, config): the teacher's loss and the default student's
        (torch.float32, None, KDConfig(alpha=0.0, beta=1.0, label_smoothing=0.1)),
        (torch.bfloat16, _topk(zt, 8), KDConfig(temperature=6.0, alpha=0.8, beta=0.2, label_smoothing=0.1)),
    ]
    for dtype, topk, config in cases:
        z0 = zs.to(dtype)
        with compiled_kernels():
            fast, grad_fast = _loss_and_grad(z0, y, topk, config)
        eager, grad_eager = _loss_and_grad(z0, y, topk, config)
        assert set(loss_module._kernels) == {"stats", "grad"}  # the compiled path ran
        for name in ("loss", "kd", "ce", "token_accuracy"):
            assert torch.allclose(getattr(fast, name), getattr(eager, name), atol=1e-6), (dtype, name)
        if topk is not None:
            assert torch.allclose(fast.teacher_agreement, eager.teacher_agreement)
        assert grad_fast.dtype == dtype
        tolerance = 1e-7 if dtype == torch.float32 else 1e-3  # bf16: one rounding of the same value
        assert torch.allclose(grad_fast.float(), grad_eager.float(), atol=tolerance)
        assert float(grad_fast[0, 4:].abs().sum()) == 0.0  # pad positions get no gradient


def test_compiled_loss_falls_back_to_eager_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(function: Any, **options: Any) -> Any:
        def run(*args: Any) -> Any:
            raise RuntimeError("no compiler")

        return run

    monkeypatch.setattr(loss_module, "_kernels", {})
    monkeypatch.setattr(loss_module, "_failed", False)
    monkeypatch.setattr(torch, "compile", broken)
    zs, zt, y = _batch(b=2, t=5, v=30, seed=7)
    config = KDConfig(label_smoothing=0.1)
    with compiled_kernels(), pytest.warns(RuntimeWarning, match="compiled loss kernels failed.*eager"):
        out, grad = _loss_and_grad(zs, y, _topk(zt, 4), config)
    ref, grad_ref = _loss_and_grad(zs, y, _topk(zt, 4), config)
    assert torch.allclose(out.loss, ref.loss) and torch.allclose(grad, grad_ref, atol=1e-7)
    with compiled_kernels(), warnings.catch_warnings():
        warnings.simplefilter("error")  # once failed, eager without another warning
        _loss_and_grad(zs, y, _topk(zt, 4), config)


def test_compile_auto_is_on_for_long_cpu_runs_with_a_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}")
    assert resolve_compile("auto", device=CPU, steps=10_000)
    assert not resolve_compile("auto", device=CPU, steps=999)  # a short run: compiling would not pay off
    assert not resolve_compile("auto", device=cuda, steps=10_000)
    assert not resolve_compile("on", device=cuda, steps=10_000)  # CPU kernels only
    assert resolve_compile("on", device=CPU, steps=1)
    assert not resolve_compile("off", device=CPU, steps=10_000)
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert not resolve_compile("auto", device=CPU, steps=10_000)  # no C compiler
