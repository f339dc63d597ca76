"""Batched greedy and beam-search decoding for CvmTransformer, plus teacher-forced rescoring."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from cvmkd_core.errors import ModelError
from cvmkd_nmt.model.transformer import CvmTransformer, DecoderCache

# Length normalisation (beam search and score_sequences) is the simple fairseq form:
#     score / length ** length_penalty
# where score is the summed log-probability and length counts the generated tokens
# including eos. length_penalty=0 ranks by raw log-probability.


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _log_probs(model: CvmTransformer, logits: Tensor) -> Tensor:
    """Float log-probabilities with pad and bos banned: they are never valid outputs, and a
    generated pad would be masked as a decoder key by the full pass but not by the cache."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    cfg = model.config
    logp[:, cfg.pad_id] = -math.inf
    logp[:, cfg.bos_id] = -math.inf
    return logp


def _best_tokens(logits: Tensor, banned: Tensor) -> Tensor:
    """The greedy choice: the largest logit with the ``banned`` ids (pad and bos) excluded (the
    argmax of :func:`_log_probs` without computing the log-softmax). Overwrites ``logits``
    (a decoding step's own output) unless it is half precision."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits.index_fill_(1, banned, -math.inf).argmax(dim=-1)


def _max_steps(model: CvmTransformer, src_ids: Tensor, max_len_a: float, max_len_b: int) -> list[int]:
    """Per-sentence output budget (tokens incl. eos) from the non-pad source length, so a
    sentence decodes the same alone or in a padded batch; capped by the model's max_len."""
    if max_len_a < 0 or max_len_b < 0 or (max_len_a == 0 and max_len_b < 1):
        raise ModelError(
            f"max_len_a and max_len_b must be >= 0 and allow at least one token, "
            f"got max_len_a={max_len_a}, max_len_b={max_len_b}"
        )
    src_len = src_ids.ne(model.config.pad_id).sum(dim=1).tolist()
    return [max(1, min(int(max_len_a * n + max_len_b), model.config.max_len)) for n in src_len]


def _strip(tokens: Sequence[int], eos_id: int, pad_id: int) -> list[int]:
    out: list[int] = []
    for tok in tokens:
        if tok == eos_id:
            break
        if tok != pad_id:
            out.append(tok)
    return out


def _step_logits(
    model: CvmTransformer,
    prev: Tensor,
    history: Tensor,
    memory: Tensor,
    src_pad_mask: Tensor,
    cache: DecoderCache | None,
    use_cache: bool,
) -> tuple[Tensor, DecoderCache | None]:
    """Last-position logits, incrementally from the cache or by re-running the full decoder."""
    if use_cache:
        return model.decode_step(prev, memory, src_pad_mask, cache)
    return model.decode(history, memory, src_pad_mask)[:, -1], None


def _keep_best(hyps: list[tuple[float, list[int]]], score: float, tokens: list[int], size: int) -> None:
    """Add a finished hypothesis, keeping only the ``size`` best (ties: the earlier stays)."""
    if len(hyps) < size:
        hyps.append((score, tokens))
        return
    worst = min(range(len(hyps)), key=lambda i: hyps[i][0])
    if score > hyps[worst][0]:
        hyps[worst] = (score, tokens)


def greedy_decode(
    model: CvmTransformer,
    src_ids: Tensor,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    use_cache: bool = True,
) -> list[list[int]]:
    """Greedy translations of a (B, S) padded batch, as token ids without bos/eos/pad.

    A sentence stops at eos or after ``int(max_len_a * src_len + max_len_b)`` tokens
    (src_len = its non-pad length). ``use_cache=False`` re-runs the whole decoder each step.
    """
    cfg = model.config
    with _eval_mode(model), torch.inference_mode():
        batch = src_ids.size(0)
        limits = _max_steps(model, src_ids, max_len_a, max_len_b)
        memory, src_pad_mask = model.encode(src_ids)
        device = src_ids.device
        limit_t = torch.tensor(limits, device=device)
        history = torch.full((batch, 1), cfg.bos_id, dtype=torch.long, device=device)
        prev = history[:, 0]
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        banned = torch.tensor([cfg.pad_id, cfg.bos_id], device=device)
        cache = None
        for step in range(max(limits)):
            logits, cache = _step_logits(model, prev, history, memory, src_pad_mask, cache, use_cache)
            tok = _best_tokens(logits, banned)
            tok = tok.masked_fill(done, cfg.pad_id)
            history = torch.cat([history, tok[:, None]], dim=1)
            done = done | tok.eq(cfg.eos_id) | (limit_t <= step + 1)
            if bool(done.all()):
                break
            # Finished rows keep decoding (their output is ignored) but must not feed pad
            # to the cache, which has no pad mask.
            prev = tok.masked_fill(tok.eq(cfg.pad_id), cfg.eos_id)
        return [_strip(row[1:], cfg.eos_id, cfg.pad_id) for row in history.tolist()]


def beam_search(
    model: CvmTransformer,
    src_ids: Tensor,
    beam_size: int = 4,
    length_penalty: float = 1.0,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    use_cache: bool = True,
) -> list[list[int]]:
    """Best beam-search translation of each sentence of a (B, S) batch, without bos/eos/pad
    (see :func:`beam_search_nbest` for the search itself)."""
    return [
        hyps[0] if hyps else []
        for hyps in beam_search_nbest(
            model,
            src_ids,
            beam_size,
            1,
            length_penalty=length_penalty,
            max_len_a=max_len_a,
            max_len_b=max_len_b,
            use_cache=use_cache,
        )
    ]


def beam_search_nbest(
    model: CvmTransformer,
    src_ids: Tensor,
    beam_size: int = 4,
    nbest: int = 1,
    length_penalty: float = 1.0,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    use_cache: bool = True,
) -> list[list[list[int]]]:
    """The ``nbest`` best beam-search translations of each sentence of a (B, S) batch, best
    first, without bos/eos/pad (``nbest <= beam_size``).

    Each step takes the top 2*beam_size candidates of a sentence. An eos candidate ranked
    within the top beam_size becomes a finished hypothesis scored
    ``logprob / len ** length_penalty`` (len includes eos); the best beam_size finished ones
    are kept. The best beam_size non-eos candidates continue. A sentence stops when it has
    beam_size finished hypotheses and its best live beam, normalised at the current length,
    no longer beats the worst of them (the Hugging Face ``early_stopping=False`` rule; unlike
    fairseq, early low-scoring eos hypotheses cannot end the search before the good ones).
    At its length limit the live beams are finished without eos. The best finished
    hypothesis wins. beam_size=1 gives exactly the greedy output.
    """
    if beam_size < 1:
        raise ModelError(f"beam_size must be > 0, got {beam_size}")
    if not 1 <= nbest <= beam_size:
        raise ModelError(f"nbest must be between 1 and beam_size ({beam_size}), got {nbest}")
    cfg = model.config
    k = beam_size
    with _eval_mode(model), torch.inference_mode():
        batch = src_ids.size(0)
        device = src_ids.device
        limits = _max_steps(model, src_ids, max_len_a, max_len_b)
        memory, src_pad_mask = model.encode(src_ids)
        memory = memory.repeat_interleave(k, dim=0)
        src_pad_mask = src_pad_mask.repeat_interleave(k, dim=0)
        vocab = cfg.vocab_size
        n_cand = min(2 * k, k * vocab)

        # Only beam 0 is live at first, so the first step does not pick k copies of one token.
        scores = torch.full((batch, k), -math.inf, device=device)
        scores[:, 0] = 0.0
        history = torch.full((batch * k, 1), cfg.bos_id, dtype=torch.long, device=device)
        prev = history[:, 0]
        base = (torch.arange(batch, device=device) * k)[:, None]
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
        done = [False] * batch
        cache = None

        for step in range(max(limits)):
            logits, cache = _step_logits(model, prev, history, memory, src_pad_mask, cache, use_cache)
            logp = _log_probs(model, logits)
            cand = (scores.view(-1, 1) + logp).view(batch, k * vocab)
            top_scores, top_idx = cand.topk(n_cand, dim=1)
            top_beam = torch.div(top_idx, vocab, rounding_mode="floor")
            top_tok = top_idx % vocab
            is_eos = top_tok.eq(cfg.eos_id)
            length = step + 1

            # Finalise eos candidates among the top k (lists: cheap Python loop over few items).
            eos_rows = is_eos[:, :k].any(dim=1).tolist()
            for b in range(batch):
                if done[b] or not eos_rows[b]:
                    continue
                row_scores = top_scores[b, :k].tolist()
                row_eos = is_eos[b, :k].tolist()
                row_beams = top_beam[b, :k].tolist()
                for j in range(k):
                    if row_eos[j] and row_scores[j] > -math.inf:
                        hyp = history[b * k + row_beams[j], 1:].tolist()
                        _keep_best(finished[b], row_scores[j] / length**length_penalty, hyp, k)

            # The best k non-eos candidates continue (at most k of the 2k are eos).
            rank = torch.arange(n_cand, device=device).expand(batch, -1) + is_eos * n_cand
            pick = rank.topk(k, dim=1, largest=False).indices
            scores = top_scores.gather(1, pick)
            new_tok = top_tok.gather(1, pick).view(-1)
            reorder = (base + top_beam.gather(1, pick)).view(-1)
            history = torch.cat([history.index_select(0, reorder), new_tok[:, None]], dim=1)
            prev = new_tok
            if cache is not None:
                # Beams are only ever re-picked within their own sentence, so the
                # cross-attention keys/values need no reordering.
                cache.reorder(reorder, include_cross=False)

            best_live = scores[:, 0].tolist()
            for b in range(batch):
                if done[b]:
                    continue
                if length >= limits[b]:
                    live = scores[b].tolist()
                    for j in range(k):
                        if live[j] > -math.inf:
                            hyp = history[b * k + j, 1:].tolist()
                            _keep_best(finished[b], live[j] / length**length_penalty, hyp, k)
                    done[b] = True
                elif len(finished[b]) >= k:
                    worst = min(score for score, _ in finished[b])
                    done[b] = best_live[b] / length**length_penalty <= worst
            if all(done):
                break

        results: list[list[list[int]]] = []
        for hyps in finished:
            # a stable sort keeps the first of equal scores, i.e. the one found earliest
            ranked = sorted(hyps, key=lambda h: -h[0])[:nbest]
            results.append([_strip(hyp, cfg.eos_id, cfg.pad_id) for _, hyp in ranked])
        return results


def score_sequences(
    model: CvmTransformer,
    src_ids: Tensor,
    hyps: Sequence[Sequence[int]],
    length_penalty: float = 1.0,
    append_eos: bool = True,
) -> list[float]:
    """Teacher-forced ``logprob / len ** length_penalty`` of each hypothesis given its source,
    with the same pad/bos ban as decoding, so it reproduces beam-search scores."""
    cfg = model.config
    if len(hyps) != src_ids.size(0):
        raise ModelError(f"got {len(hyps)} hypotheses for {src_ids.size(0)} source sentences")
    with _eval_mode(model), torch.inference_mode():
        targets = [list(h) + ([cfg.eos_id] if append_eos else []) for h in hyps]
        width = max(1, max(len(t) for t in targets))
        tgt_out = torch.full((len(targets), width), cfg.pad_id, dtype=torch.long)
        for i, t in enumerate(targets):
            tgt_out[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        tgt_out = tgt_out.to(src_ids.device)
        bos = torch.full_like(tgt_out[:, :1], cfg.bos_id)
        tgt_in = torch.cat([bos, tgt_out[:, :-1]], dim=1)
        logits = model(src_ids, tgt_in)
        b, t, v = logits.shape
        logp = _log_probs(model, logits.reshape(b * t, v)).view(b, t, v)
        token_logp = logp.gather(2, tgt_out[:, :, None]).squeeze(2)
        token_logp = token_logp.masked_fill(tgt_out.eq(cfg.pad_id), 0.0)
        return [float(token_logp[i].sum()) / max(1, len(targets[i])) ** length_penalty for i in range(b)]


def timed_decode(model: CvmTransformer, src_ids: Tensor, steps: int) -> float:
    """Seconds to encode a (B, S) batch and greedily decode exactly ``steps`` positions for every
    row, ignoring eos: the model's decoding speed, independent of how long its outputs are
    (a model that stops early, or one that loops, would otherwise look faster or slower)."""
    import time

    if hasattr(model, "timed_decode"):  # a model of another library decodes with its own engine
        return float(model.timed_decode(src_ids, steps))  # type: ignore[operator]
    cfg = model.config
    steps = min(steps, cfg.max_len - 1)
    with _eval_mode(model), torch.inference_mode():
        started = time.perf_counter()
        memory, src_pad_mask = model.encode(src_ids)
        prev = torch.full((src_ids.size(0),), cfg.bos_id, dtype=torch.long, device=src_ids.device)
        cache = None
        for _ in range(steps):
            logits, cache = model.decode_step(prev, memory, src_pad_mask, cache)
            prev = logits.argmax(dim=-1)
        return time.perf_counter() - started
