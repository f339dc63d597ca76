"""Word-level knowledge-distillation loss with temperature (Hinton et al., 2015; Kim & Rush, 2016).

The teacher is given either as full logits or as cached top-k log-probabilities (see teacher_cache).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from cvmkd_core.config import ConfigValueError, between, ge, gt, one_of
from cvmkd_core.errors import ModelError
from cvmkd_nmt.hardware import find_compiler

__all__ = [
    "KDConfig",
    "KDLossOutput",
    "check_vocab",
    "kd_loss",
    "label_smoothed_ce",
    "compiled_kernels",
    "resolve_compile",
]


@attrs.frozen
class KDConfig:
    """Weights of the distillation loss: ``alpha * T**2 * KL + beta * CE`` at temperature ``T``.

    ``label_smoothing`` applies to the cross-entropy term only.
    """

    temperature: float = attrs.field(default=6.0, validator=gt(0))
    alpha: float = attrs.field(default=0.8, validator=ge(0))
    beta: float = attrs.field(default=0.2, validator=ge(0))
    label_smoothing: float = attrs.field(default=0.0, validator=between(0.0, 1.0, high_open=True))
    topk_tail: str = attrs.field(default="bucket", validator=one_of("bucket", "renormalize"))
    """with cached top-k teacher outputs: ``bucket`` keeps the teacher's mass outside the top k as
    one extra class (spread evenly over the other tokens), ``renormalize`` drops it"""

    def __attrs_post_init__(self) -> None:
        if self.alpha == 0 and self.beta == 0:
            raise ConfigValueError(
                f"alpha and beta must not both be zero, got alpha={self.alpha!r}, beta={self.beta!r}"
            )


@attrs.frozen(eq=False)
class KDLossOutput:
    """Result of :func:`kd_loss`.

    Only ``loss`` carries gradients. ``kd``, ``ce`` and the two shares are detached 0-dim float32
    tensors on the logits' device: call ``float()`` on them when logging.
    """

    loss: torch.Tensor
    """``alpha * T**2 * kd + beta * ce``: the scalar to backpropagate."""
    kd: torch.Tensor
    """KL(teacher_T || student_T) per non-pad token, without ``T**2``; 0 if no teacher."""
    ce: torch.Tensor
    """(Label-smoothed) cross-entropy with the reference per non-pad token, at temperature 1."""
    n_tokens: int
    """Number of non-pad target tokens that the two terms are averaged over."""
    token_accuracy: torch.Tensor
    """Share of non-pad tokens where the student's argmax is the reference token."""
    teacher_agreement: torch.Tensor | None
    """Share of non-pad tokens where the student's argmax is the teacher's; None if no teacher."""


def check_vocab(teacher_vocab: int, student_vocab: int, *, at_least: bool = False) -> None:
    """Raise :class:`ModelError` unless teacher and student share a vocabulary size.

    ``at_least`` words the message for a teacher known only through its largest token id.
    """
    if teacher_vocab != student_vocab:
        size = f"at least {teacher_vocab} ids" if at_least else str(teacher_vocab)
        raise ModelError(
            f"teacher vocabulary ({size}) differs from the student's ({student_vocab}): "
            "distil with the teacher's tokenizer"
        )


def _smoothed_nll(logp: torch.Tensor, targets: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Per-token loss from fp32 log-probs ``(N, V)``; torch's definition (uniform over all V)."""
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if epsilon == 0:
        return nll
    return (1 - epsilon) * nll - epsilon * logp.mean(-1)


def label_smoothed_ce(logits: torch.Tensor, targets: torch.Tensor, pad_id: int, epsilon: float) -> torch.Tensor:
    """Label-smoothed cross-entropy averaged over the non-pad tokens (used to train the teacher).

    Equals ``F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=pad_id,
    label_smoothing=epsilon)``: the smoothing mass is spread over the whole vocabulary, the
    reference included. The log-softmax runs in fp32 so bf16 logits lose no precision. Returns
    0 (still differentiable) when there is no non-pad token.
    """
    if not 0 <= epsilon < 1:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon!r}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    mask = targets != pad_id
    # Selecting the non-pad rows first keeps inf/NaN logits at pad positions out of the sum.
    logp = F.log_softmax(logits[mask].float(), dim=-1)
    per_token = _smoothed_nll(logp, targets[mask], epsilon)
    return per_token.sum() / max(per_token.numel(), 1)


def _bucket_kl(
    lp_k: torch.Tensor, ids_k: torch.Tensor, logp_s: torch.Tensor, temperature: float, tail: int
) -> torch.Tensor:
    """Per-token KL over k + 1 classes: the teacher's top-k tokens, and "everything else".

    The teacher's remaining mass ``r = 1 - sum(top-k)`` (known at T=1) is taken as spread evenly
    over the ``tail`` other tokens, so at temperature ``T`` each gets ``(r / tail) ** (1/T)``
    before normalisation: a high temperature moves much of the softened mass there, as it does
    with the full distribution. The student's "everything else" is its own mass outside the
    top-k. This is the KL between the two distributions coarsened to those k + 1 classes: a lower
    bound of the full KL, equal to it when both spread their tail mass evenly.
    """
    log_r = torch.log1p(-lp_k.exp().sum(-1).clamp(max=1.0 - 1e-6))  # (N,)
    logits_k = lp_k / temperature
    log_tail_mass = math.log(tail) + (log_r - math.log(tail)) / temperature
    log_z = torch.logaddexp(torch.logsumexp(logits_k, dim=-1), log_tail_mass)
    logq = logits_k - log_z.unsqueeze(-1)
    log_rest_t = log_tail_mass - log_z
    logp_s_k = logp_s.gather(-1, ids_k)
    # the student's mass outside the top-k from the k gathered values: no second pass over V
    logp_s_rest = torch.log1p(-logp_s_k.exp().sum(-1).clamp(max=1.0 - 1e-6))
    return (logq.exp() * (logq - logp_s_k)).sum(-1) + log_rest_t.exp() * (log_rest_t - logp_s_rest)


# --- the vocabulary passes, compiled ------------------------------------------------------------
#
# On a CPU most of the fused loss's time goes to passes over the (N, V) logits: each eager
# operation (a cast, a log-softmax, a mean, an exp, a multiply...) reads and writes all of them.
# torch.compile (inductor, a C++ compiler) fuses them: the forward needs only four numbers per
# row (two log-sum-exps, the sum and the largest logit), read in one kernel, and the gradient is
# one kernel writing (N, V) in the logits' dtype. Measured on the student's KD loss (1,152 x 6,000
# bf16 logits, Zen 4, 2 threads): forward and backward 36-43 -> 18-24 ms, of which the two
# kernels take 14.

#: the compiled functions, built at their first use
_kernels: dict[str, Callable[..., Any]] = {}
#: whether the loss computed now takes them (see compiled_kernels)
_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("cvmkd_compiled_loss", default=False)
#: set when compiling failed: the process's losses stay eager
_failed = False


def _row_stats(z: torch.Tensor, inv_t: torch.Tensor, with_t: bool) -> tuple[torch.Tensor, ...]:
    """Per row of the logits (N, V), in fp32, each (N, 1): logsumexp(z), logsumexp(z / T) (or
    the row's largest logit without a KD term), the sum of z and its largest value."""
    zf = z.float()
    top = zf.amax(-1, keepdim=True)
    shifted = zf - top
    lse = top + shifted.exp().sum(-1, keepdim=True).log()
    lse_t = top * inv_t + (shifted * inv_t).exp().sum(-1, keepdim=True).log() if with_t else top
    return lse, lse_t, zf.sum(-1, keepdim=True), top


def _row_grad(
    z: torch.Tensor,
    lse: torch.Tensor,
    w_ce: torch.Tensor,
    shift: torch.Tensor,
    y: torch.Tensor,
    w_y: torch.Tensor,
    kd: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """The loss's gradient with respect to z (N, V), in z's dtype (see :class:`_FusedLoss`):
    ``w_ce * softmax(z) - shift`` with ``w_y`` added at the reference, and with ``kd = (lse_t,
    inv_t, w_t, ids_k, w_k)`` ``w_t * softmax(z / T)`` with ``w_k`` added at the teacher's top k."""
    zf = z.float()
    out = (zf - lse).exp() * w_ce - shift
    if kd is not None:
        lse_t, inv_t, w_t, ids_k, w_k = kd
        out = out + (zf * inv_t - lse_t).exp() * w_t
    out = out.scatter_add(-1, y.unsqueeze(-1), w_y.expand(y.shape[0], 1))
    if kd is not None:
        out = out.scatter_add(-1, kd[3], kd[4])
    return out.to(z.dtype)


def resolve_compile(mode: str, *, device: torch.device, steps: int) -> bool:
    """Whether a run takes the compiled vocabulary passes of the fused loss: ``mode`` ``"on"``,
    ``"off"``, or ``"auto"``: on for a CPU run of at least 1,000 steps where a C++ compiler is found
    (compiling takes a few seconds with inductor's cache warm, about 20 without; at ~25 ms saved
    per student step it pays off within a few hundred steps). They are CPU kernels: a run on
    another device keeps the eager passes whatever ``mode`` says."""
    if device.type != "cpu" or mode == "off":
        return False
    return mode == "on" or (steps >= 1000 and cxx_compiler() is not None)


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use for CPU kernels (``$CXX``, else c++, g++ or clang++)."""
    return find_compiler("CXX", ("c++", "g++", "clang++"))


@contextlib.contextmanager
def compiled_kernels(enabled: bool = True) -> Iterator[None]:
    """Losses computed inside take the compiled vocabulary passes (on CPU tensors) when
    ``enabled``; their backward follows their forward's choice wherever it runs. Should
    compiling fail, the loss warns once and the process's losses stay eager."""
    token = _enabled.set(enabled)
    try:
        yield
    finally:
        _enabled.reset(token)


def _compiled(name: str, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` through its compiled form (built once); None where compilation is off
    or has failed."""
    global _failed
    if _failed:
        return None
    if name not in _kernels:
        import torch._inductor.config as inductor

        inductor.compile_threads = 1  # no pool of compiler processes beside the run's own
        _kernels[name] = torch.compile(function, dynamic=True)
    try:
        return _kernels[name](*args)
    except Exception as error:  # a missing or broken compiler: the eager passes are the same loss
        _failed = True
        first = (str(error).strip().splitlines() or [""])[0][:200]
        warnings.warn(
            f"compiled loss kernels failed ({type(error).__name__}: {first}): the loss runs eager",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


class _FusedLoss(torch.autograd.Function):
    """``alpha * T**2 * KD + beta * CE`` over rows of student logits, with the gradient written out.

    The same loss as the autograd path of :func:`kd_loss` for the cases training uses most (the
    cross-entropy alone, or with the bucketed top-k KD term), but each (N, V) pass of autograd's
    log-softmax and gather backward is folded into one expression: the gradient of the
    cross-entropy is ``softmax(z) - (1 - eps) * onehot(y) - eps / V``, and that of the KD term,
    through the k gathered log-probabilities ``l_i`` of the student at temperature T, is
    ``(scatter(c) - sum(c) * softmax(z / T)) / T`` with ``c_i = dKD/dl_i``. Returns the loss, the
    two terms, and per row the log-probabilities of the reference and the teacher's top token and
    the largest log-probability (for accuracy and agreement without an argmax over V).

    On CPU tensors inside :func:`compiled_kernels`, the passes over (N, V) are the compiled
    :func:`_row_stats` and :func:`_row_grad`, and only z is kept for the backward; otherwise the
    log-probabilities are computed eagerly and kept.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        z: torch.Tensor,
        y: torch.Tensor,
        lp_k: torch.Tensor | None,
        ids_k: torch.Tensor | None,
        config: KDConfig,
        denom: int,
    ) -> tuple[torch.Tensor, ...]:
        vocab = z.shape[-1]
        eps, temperature = config.label_smoothing, config.temperature
        with_kd = lp_k is not None and ids_k is not None
        inv_t = torch.tensor(1.0 / temperature)
        on = _enabled.get() and z.device.type == "cpu"
        stats = _compiled("stats", _row_stats, z, inv_t, with_kd) if on else None
        if stats is not None:  # log-probabilities from z and the row statistics, at the few ids needed
            lse, lse_t, z_sum, z_max = stats

            def logp_at(ids: torch.Tensor) -> torch.Tensor:
                return z.gather(-1, ids).float() - lse

            def logp_t_at(ids: torch.Tensor) -> torch.Tensor:
                return z.gather(-1, ids).float() / temperature - lse_t

            logp_mean = (z_sum / vocab - lse).squeeze(-1)
            best = (z_max - lse).squeeze(-1)
            saved: tuple[torch.Tensor, ...] = (z, lse, y)
        else:
            zf = z.float()
            logp = F.log_softmax(zf, dim=-1)
            logp_t_full = F.log_softmax(zf / temperature, dim=-1) if with_kd else None

            def logp_at(ids: torch.Tensor) -> torch.Tensor:
                return logp.gather(-1, ids)

            def logp_t_at(ids: torch.Tensor) -> torch.Tensor:
                assert logp_t_full is not None
                return logp_t_full.gather(-1, ids)

            logp_mean, best = logp.mean(-1), logp.amax(-1)
            saved = (logp, y)
        ly = logp_at(y.unsqueeze(-1)).squeeze(-1)
        ce_tok = -ly if eps == 0 else -(1 - eps) * ly - eps * logp_mean
        ce = ce_tok.sum() / denom
        kd = ce.new_zeros(())
        top1 = ly
        if lp_k is not None and ids_k is not None:
            logp_s_k = logp_t_at(ids_k)
            tail = vocab - ids_k.shape[-1]
            log_r = torch.log1p(-lp_k.exp().sum(-1).clamp(max=1.0 - 1e-6))
            logits_k = lp_k / temperature
            log_tail_mass = math.log(tail) + (log_r - math.log(tail)) / temperature
            log_z = torch.logaddexp(torch.logsumexp(logits_k, dim=-1), log_tail_mass)
            logq = logits_k - log_z.unsqueeze(-1)
            q, q_rest = logq.exp(), (log_tail_mass - log_z).exp()
            p_k = logp_s_k.exp()
            mass = p_k.sum(-1)
            unclamped = mass < 1.0 - 1e-6
            logp_s_rest = torch.log1p(-mass.clamp(max=1.0 - 1e-6))
            kd_tok = (q * (logq - logp_s_k)).sum(-1) + q_rest * (log_tail_mass - log_z - logp_s_rest)
            kd = kd_tok.sum() / denom
            # dKD_tok / dl_i: -q_i from the top-k sum, q_rest * p_i / (1 - mass) through the rest
            # (zero where the rest's mass was clamped, as autograd's clamp gives)
            rest = torch.where(unclamped, q_rest / (1 - mass).clamp(min=1e-6), torch.zeros_like(mass))
            c = rest.unsqueeze(-1) * p_k - q
            # the backward's softmax(z / T): from its log-sum-exp (compiled) or kept whole (eager)
            tempered = stats[1] if stats is not None else logp_t_full
            assert tempered is not None
            saved = (*saved, tempered, ids_k, c)
            top1 = logp_at(ids_k.gather(-1, lp_k.argmax(-1, keepdim=True))).squeeze(-1)
        ctx.save_for_backward(*saved)
        ctx.config, ctx.denom, ctx.dtype = config, denom, z.dtype  # type: ignore[attr-defined]
        ctx.compiled = stats is not None  # type: ignore[attr-defined]
        loss = config.alpha * temperature**2 * kd + config.beta * ce
        return loss, kd, ce, ly, top1, best

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor, *unused: Any) -> tuple[Any, ...]:
        saved = ctx.saved_tensors  # type: ignore[attr-defined]
        config, denom = ctx.config, ctx.denom  # type: ignore[attr-defined]
        eps = config.label_smoothing
        w_ce = grad * (config.beta / denom)
        w_kd = grad * (config.alpha * config.temperature / denom)  # alpha * T**2 * (1 / T)
        if ctx.compiled:  # type: ignore[attr-defined]
            z, lse, y = saved[:3]
            kd = None
            if len(saved) > 3:
                lse_t, ids_k, c = saved[3:]
                inv_t = torch.tensor(1.0 / config.temperature)
                kd = (lse_t, inv_t, -w_kd * c.sum(-1, keepdim=True), ids_k, c * w_kd)
            shift = w_ce * (eps / z.shape[-1])
            out = _compiled("grad", _row_grad, z, lse, w_ce, shift, y, -(1 - eps) * w_ce, kd)
            if out is not None:
                return out, None, None, None, None, None
            # compilation failed here: the eager gradient from z
            zf = z.float()
            logp = F.log_softmax(zf, dim=-1)
            saved = (logp, y) + ((F.log_softmax(zf / config.temperature, dim=-1), *saved[4:]) if kd else ())
        logp, y = saved[0], saved[1]
        out = logp.exp().mul_(w_ce)
        if eps:
            out.sub_(w_ce * (eps / logp.shape[-1]))
        out.scatter_add_(-1, y.unsqueeze(-1), (-(1 - eps) * w_ce).expand(y.shape[0], 1).contiguous())
        if len(saved) > 2:
            logp_t, ids_k, c = saved[2:]
            out.addcmul_(logp_t.exp(), c.sum(-1, keepdim=True), value=-1.0 * float(w_kd))
            out.scatter_add_(-1, ids_k, c * w_kd)
        return out.to(ctx.dtype), None, None, None, None, None  # type: ignore[attr-defined]


def kd_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    pad_id: int,
    teacher_logits: torch.Tensor | None = None,
    *,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: KDConfig,
    fused: bool = True,
) -> KDLossOutput:
    r"""Word-level distillation loss over the non-pad target tokens.

    With ``z_s``, ``z_t`` the student's and teacher's logits, ``y`` the reference and ``T`` the
    temperature, and ``N`` the number of tokens with ``y != pad_id``::

        loss = alpha * T**2 * KD + beta * CE
        KD   = 1/N * sum_{tokens} sum_{v in V} p_t(v) * (log p_t(v) - log p_s(v))
               with p_t = softmax(z_t / T), p_s = softmax(z_s / T)
        CE   = 1/N * sum_{tokens} -log softmax(z_s)[y]     (label-smoothed if configured)

    i.e. the per-token KL is summed over the vocabulary and averaged over tokens (not over the
    vocabulary). ``T**2`` keeps the KD gradients' magnitude independent of ``T``, whose softening
    otherwise shrinks them by ``1/T**2``. Pad positions are dropped before any arithmetic, so their
    logits (even inf/NaN) cannot affect the loss or its gradients. Every log-softmax runs in fp32.

    The teacher is given as exactly one of:

    * ``teacher_logits`` ``(B, T, V)``;
    * ``teacher_topk = (logprobs, ids)``, each ``(B, T, k)``: the teacher's top-k log-probabilities
      at temperature 1 and their token ids, as stored by the teacher cache. The teacher's
      distribution is then approximated by renormalising it over those k ids at temperature ``T``,
      with ``config.topk_tail = "bucket"`` (the default) the KL is taken over k + 1 classes, the
      top-k tokens and "the rest", the teacher's rest mass spread evenly over the other tokens
      before softening (see :func:`_bucket_kl`); with ``"renormalize"`` the teacher's
      distribution is renormalised over the k ids, ``q = softmax(logprobs / T)``, and
      ``KD = sum_{i<k} q_i * (log q_i - log p_s(id_i))``. Both are >= 0 and equal the full KL
      when ``k == V``. Renormalising flattens the target at a high temperature and pushes all of
      the student's softened mass into k tokens; the bucket keeps the share a high temperature
      gives to the tail.

    ``student_logits`` may also be rows ``(N, V)`` with ``targets`` ``(N,)`` and the teacher's
    tensors ``(N, k)`` or ``(N, V)``: the positions a model projected alone (``rows=`` of
    :meth:`CvmTransformer.forward`), so no pad position costs a product with the vocabulary.

    With the cross-entropy alone or with cached top-k bucketed KD (what training uses), the
    gradient is computed by :class:`_FusedLoss` in a few passes over (N, V) instead of autograd's
    many; ``fused=False`` takes autograd through every operation (the reference it is tested
    against). Token accuracy then counts ties for the largest logit as hits.

    Teacher inputs are detached: no gradient reaches the teacher. The teacher may be omitted only
    when ``config.alpha == 0``. A term whose weight is 0 is computed without gradient, for logging.
    With no non-pad token the loss is 0 (differentiable), not NaN.

    Raises :class:`ModelError` if teacher and student vocabularies differ, ``ValueError`` on other
    shape mismatches.
    """
    if student_logits.dim() < 2 or student_logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"student logits must be (B, T, V) matching targets (B, T), or rows (N, V) matching (N,), "
            f"got {tuple(student_logits.shape)} and {tuple(targets.shape)}"
        )
    if teacher_logits is not None and teacher_topk is not None:
        raise ValueError("give the teacher as teacher_logits or teacher_topk, not both")
    has_teacher = teacher_logits is not None or teacher_topk is not None
    if not has_teacher and config.alpha > 0:
        raise ValueError(f"alpha={config.alpha} needs a teacher: pass teacher_logits or teacher_topk")
    vocab = student_logits.shape[-1]
    if teacher_logits is not None:
        if teacher_logits.shape[:-1] != targets.shape:
            raise ValueError(
                f"teacher logits {tuple(teacher_logits.shape)} do not match targets {tuple(targets.shape)}"
            )
        check_vocab(teacher_logits.shape[-1], vocab)
    if teacher_topk is not None:
        topk_logprobs, topk_ids = teacher_topk
        if topk_logprobs.shape != topk_ids.shape or topk_ids.shape[:-1] != targets.shape:
            raise ValueError(
                f"teacher top-k log-probs {tuple(topk_logprobs.shape)} and ids "
                f"{tuple(topk_ids.shape)} must both be the targets' shape {tuple(targets.shape)} + (k,)"
            )
        if topk_ids.numel():
            if int(topk_ids.min()) < 0:
                raise ValueError(f"teacher top-k ids must be >= 0, got {int(topk_ids.min())}")
            if int(topk_ids.max()) >= vocab:
                check_vocab(int(topk_ids.max()) + 1, vocab, at_least=True)

    mask = targets != pad_id
    n_tokens = int(mask.sum())
    denom = max(n_tokens, 1)
    # (N, V) rows of the non-pad tokens only: pad rows never enter the graph.
    if n_tokens == targets.numel():  # rows already selected: no copy
        z_s, y = student_logits.reshape(-1, vocab), targets.reshape(-1)
    else:
        z_s, y = student_logits[mask], targets[mask]
    fused = fused and teacher_logits is None and torch.is_grad_enabled() and z_s.requires_grad
    if teacher_topk is not None:
        fused = fused and config.topk_tail == "bucket" and vocab > topk_ids.shape[-1]
    if fused:
        lp_k: torch.Tensor | None = None
        ids_k: torch.Tensor | None = None
        if teacher_topk is not None:
            flat = mask.reshape(-1)
            lp_k = topk_logprobs.detach().reshape(-1, topk_ids.shape[-1])[flat].float()
            ids_k = topk_ids.detach().reshape(-1, topk_ids.shape[-1])[flat].long()
        loss, kd, ce, ly, top1, best = _FusedLoss.apply(z_s, y, lp_k, ids_k, config, denom)
        with torch.no_grad():
            # the largest log-probability is the reference's (the teacher's top token's): the
            # argmax's answer, without its slower pass over V (ties count as hits)
            token_accuracy = (ly >= best).float().sum() / denom
            agreement = (top1 >= best).float().sum() / denom if lp_k is not None else None
    else:
        loss, kd, ce, token_accuracy, agreement = _autograd_terms(
            z_s, y, mask, vocab, teacher_logits, teacher_topk, config, denom
        )
    return KDLossOutput(
        loss=loss,
        kd=kd.detach(),
        ce=ce.detach(),
        n_tokens=n_tokens,
        token_accuracy=token_accuracy,
        teacher_agreement=agreement,
    )


def _autograd_terms(
    z_s: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    vocab: int,
    teacher_logits: torch.Tensor | None,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None,
    config: KDConfig,
    denom: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """kd_loss's terms through autograd (every case; the reference of the fused path)."""
    temperature = config.temperature
    has_teacher = teacher_logits is not None or teacher_topk is not None
    zf_s = z_s.float()  # bf16 under autocast: log-softmax over V needs fp32's range/precision

    with torch.set_grad_enabled(torch.is_grad_enabled() and config.beta > 0):
        logp = F.log_softmax(zf_s, dim=-1)
        ce = _smoothed_nll(logp, y, config.label_smoothing).sum() / denom

    kd = ce.new_zeros(())
    teacher_top1: torch.Tensor | None = None
    if has_teacher:
        with torch.set_grad_enabled(torch.is_grad_enabled() and config.alpha > 0):
            logp_s = F.log_softmax(zf_s / temperature, dim=-1)
            if teacher_logits is not None:
                z_t = teacher_logits.detach()[mask]
                logp_t = F.log_softmax(z_t.float() / temperature, dim=-1)
                teacher_top1 = z_t.argmax(-1)
                # sum_v p_t (log p_t - log p_s); kl_div's argument order is (input=student, target).
                kd_tok = F.kl_div(logp_s, logp_t, reduction="none", log_target=True).sum(-1)
            else:
                assert teacher_topk is not None
                lp_k = teacher_topk[0].detach()[mask].float()
                ids_k = teacher_topk[1].detach()[mask].long()
                teacher_top1 = ids_k.gather(-1, lp_k.argmax(-1, keepdim=True)).squeeze(-1)
                tail = vocab - ids_k.shape[-1]
                if config.topk_tail == "bucket" and tail > 0:
                    kd_tok = _bucket_kl(lp_k, ids_k, logp_s, temperature, tail)
                else:
                    logq = F.log_softmax(lp_k / temperature, dim=-1)
                    kd_tok = (logq.exp() * (logq - logp_s.gather(-1, ids_k))).sum(-1)
            kd = kd_tok.sum() / denom

    loss = config.alpha * temperature**2 * kd + config.beta * ce

    with torch.no_grad():
        pred = logp.argmax(-1)  # fp32: argmax over bf16 is several times slower on a CPU
        token_accuracy = (pred == y).float().sum() / denom
        agreement = None
        if teacher_top1 is not None:
            agreement = (pred == teacher_top1).float().sum() / denom
    return loss, kd, ce, token_accuracy, agreement
