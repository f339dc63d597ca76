"""Training rounds its shapes (batch widths, the positions projected onto the vocabulary) so
that the CPU's kernels are reused; the extra padding must change nothing the model learns."""

from __future__ import annotations

import torch

from cvmkd_kd.loss import KDConfig, kd_loss
from cvmkd_kd.trainer import target_rows
from cvmkd_nmt.data.batching import make_batch
from cvmkd_nmt.model.presets import preset
from cvmkd_nmt.model.transformer import CvmTransformer

PAD, BOS, EOS = 0, 1, 2


def test_target_rows_keeps_every_target_and_rounds_with_padding() -> None:
    tgt = torch.tensor([[5, 6, 7, PAD, PAD], [8, PAD, PAD, PAD, PAD], [9, 9, 9, 9, PAD]])
    rows = target_rows(tgt, PAD, multiple=5)
    assert int(rows.sum()) == 10 and bool(rows[tgt.ne(PAD)].all())
    assert int(target_rows(tgt, PAD, multiple=1).sum()) == 8
    # not enough padding to round up to 64: every position, no more
    assert int(target_rows(tgt, PAD, multiple=64).sum()) == tgt.numel()


def _loss_and_grads(model: CvmTransformer, batch, rows: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(batch.src, batch.tgt_in, rows=rows)
    out = kd_loss(logits, batch.tgt_out[rows], PAD, config=KDConfig(alpha=0.0, beta=1.0, label_smoothing=0.1))
    out.loss.backward()
    assert out.n_tokens == batch.n_tokens
    return float(out.loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_padded_batches_and_rounded_rows_train_exactly_like_exact_ones() -> None:
    torch.manual_seed(0)
    model = CvmTransformer(preset("tiny", vocab_size=30)).eval()  # no dropout: same computation
    src = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    tgt = [[15, 16, 17], [18, 19, 20, 21, 22, 23], [24]]
    exact = make_batch(src, tgt, PAD, BOS, EOS)
    padded = make_batch(src, tgt, PAD, BOS, EOS, pad_multiple=8)
    assert padded.src.shape[1] == 8 > exact.src.shape[1]
    loss, grads = _loss_and_grads(model, exact, exact.tgt_out.ne(PAD))
    rows = target_rows(padded.tgt_out, PAD, multiple=16)
    assert int(rows.sum()) == 16 > exact.n_tokens
    loss_padded, grads_padded = _loss_and_grads(model, padded, rows)
    assert abs(loss - loss_padded) < 1e-6
    assert grads.keys() == grads_padded.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_padded[name], grad, rtol=1e-5, atol=1e-7, msg=name)
