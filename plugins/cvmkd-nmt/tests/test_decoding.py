"""Tests of greedy and beam decoding: cache == no cache, padding invariance, beam vs greedy."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from cvmkd_nmt.model import CvmTransformer, beam_search, greedy_decode, preset, score_sequences

EOS = 2


def _pad(rows: list[list[int]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows])


def _random_sequences(n: int, low: int, high: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(low, high, (k,), generator=g).tolist() for k in lengths]


class Toy:
    """A tiny model briefly trained to reverse 32 sequences, plus unseen sources on which
    it is unsure, so beams genuinely differ from greedy."""

    def __init__(self) -> None:
        self.train_seqs = _random_sequences(32, 4, 20, 3, 7, seed=1)
        self.train_src = _pad([s + [EOS] for s in self.train_seqs])
        self.novel_src = _pad([s + [EOS] for s in _random_sequences(24, 4, 30, 3, 11, seed=7)])
        torch.manual_seed(0)
        self.model = CvmTransformer(preset("tiny"))
        tgt_in = _pad([[1] + s[::-1] for s in self.train_seqs])
        tgt_out = _pad([s[::-1] + [EOS] for s in self.train_seqs])
        opt = torch.optim.Adam(self.model.parameters(), lr=3e-3)
        self.model.train()
        for _ in range(80):
            logits = self.model(self.train_src, tgt_in)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.model.eval()
        # Exact-equality checks run in float64 so that no near-tie can flip on other CPUs.
        self.model64 = copy.deepcopy(self.model).double()


@pytest.fixture(scope="module")
def toy() -> Iterator[Toy]:
    # Two intra-op threads make this tiny model's backward ~8x slower on a 2-core box.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield Toy()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def random_model() -> CvmTransformer:
    torch.manual_seed(3)
    return CvmTransformer(preset("tiny")).eval()


def _random_src() -> torch.Tensor:
    return _pad([s + [EOS] for s in _random_sequences(5, 3, 64, 2, 12, seed=11)])


def test_toy_model_learned_its_task(toy: Toy) -> None:
    out = greedy_decode(toy.model, toy.train_src)
    assert out == [s[::-1] for s in toy.train_seqs]


# -- cache == no cache -------------------------------------------------------------------------


def test_greedy_cached_equals_uncached_random_model(random_model: CvmTransformer) -> None:
    src = _random_src()
    cached = greedy_decode(random_model, src)
    assert cached == greedy_decode(random_model, src, use_cache=False)
    assert all(len(row) > 0 for row in cached)


def test_beam_cached_equals_uncached_random_model(random_model: CvmTransformer) -> None:
    src = _random_src()
    assert beam_search(random_model, src, beam_size=3) == beam_search(random_model, src, beam_size=3, use_cache=False)


@pytest.mark.parametrize("which", ["train_src", "novel_src"])
def test_greedy_cached_equals_uncached_trained(toy: Toy, which: str) -> None:
    src = getattr(toy, which)
    assert greedy_decode(toy.model64, src) == greedy_decode(toy.model64, src, use_cache=False)


@pytest.mark.parametrize(("beam", "length_penalty"), [(2, 1.0), (4, 0.0), (5, 1.0)])
def test_beam_cached_equals_uncached_trained(toy: Toy, beam: int, length_penalty: float) -> None:
    kwargs = {"beam_size": beam, "length_penalty": length_penalty}
    cached = beam_search(toy.model64, toy.novel_src, **kwargs)
    assert cached == beam_search(toy.model64, toy.novel_src, use_cache=False, **kwargs)
    # Guard against a vacuous test: the beams must actually differ from greedy somewhere.
    assert cached != greedy_decode(toy.model64, toy.novel_src)


def _one_sentence_sources(src: torch.Tensor) -> list[torch.Tensor]:
    return [row[row.ne(0)][None] for row in src]


def test_one_sentence_decodes_alike_with_the_few_row_kernel(toy: Toy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding one sentence (one row; a beam of four) multiplies through cvmkd's C row product
    where a C compiler is: the same tokens as torch's products, logits within float32 rounding."""
    from cvmkd_nmt import kernels

    if kernels.row_product(torch.ones(2, 2), None) is None:
        pytest.skip("no C compiler on this machine: decoding multiplies through torch")
    from cvmkd_nmt.model import transformer

    sources = _one_sentence_sources(toy.novel_src)[:8]
    rows_seen: list[int] = []

    def counted(weight: torch.Tensor, bias: torch.Tensor | None):  # type: ignore[no-untyped-def]
        linear = kernels.row_product(weight, bias)
        if linear is None:
            return None
        return lambda x: (rows_seen.append(x.size(0)), linear(x))[1]

    monkeypatch.setattr(transformer, "row_product", counted)

    def decode() -> tuple[list[list[int]], list[list[int]], torch.Tensor]:
        greedy = [greedy_decode(toy.model, s)[0] for s in sources]
        beams = [beam_search(toy.model, s, beam_size=4)[0] for s in sources]
        with torch.inference_mode():
            memory, mask = toy.model.encode(sources[0])
            logits, cache = toy.model.decode_step(torch.tensor([1]), memory, mask)
            logits2, _ = toy.model.decode_step(logits.argmax(-1), memory, mask, cache)
        return greedy, beams, torch.cat([logits, logits2])

    with_kernel = decode()
    assert {1, 4} <= set(rows_seen)  # one sentence, and a beam of four, went through the kernel
    monkeypatch.setattr(kernels, "enabled", False)
    with_torch = decode()
    assert with_kernel[0] == with_torch[0] and with_kernel[1] == with_torch[1]
    assert torch.allclose(with_kernel[2], with_torch[2], rtol=1e-5, atol=1e-5)


# -- beam vs greedy -----------------------------------------------------------------------------


def test_beam_size_one_equals_greedy(toy: Toy, random_model: CvmTransformer) -> None:
    cases = [(toy.model, toy.novel_src), (toy.model, toy.train_src), (random_model, _random_src())]
    for model, src in cases:
        assert beam_search(model, src, beam_size=1) == greedy_decode(model, src)
        assert beam_search(model, src, beam_size=1, length_penalty=0.0) == greedy_decode(model, src)


def _scores(model: CvmTransformer, src: torch.Tensor, hyps: list[list[int]], lp: float) -> list[float]:
    """Scores as decoding ranks them: hypotheses cut at the length limit (1.2 * len + 10)
    were scored without an eos, the others with one."""
    out = []
    for i, hyp in enumerate(hyps):
        limit = int(1.2 * int(src[i].ne(0).sum()) + 10)
        row = src[i : i + 1]
        out += score_sequences(model, row, [hyp], lp, append_eos=len(hyp) < limit)
    return out


@pytest.mark.parametrize(("beam", "length_penalty"), [(4, 1.0), (4, 0.0), (6, 1.0)])
def test_beam_score_at_least_greedy_score(toy: Toy, beam: int, length_penalty: float) -> None:
    # Not a theorem (beam search can prune the greedy path; it happens here with beam 2),
    # but with a reasonable beam on this toy it must hold sentence by sentence.
    src = toy.novel_src
    greedy = greedy_decode(toy.model, src)
    beamed = beam_search(toy.model, src, beam_size=beam, length_penalty=length_penalty)
    greedy_scores = _scores(toy.model, src, greedy, length_penalty)
    beam_scores = _scores(toy.model, src, beamed, length_penalty)
    for g, b in zip(greedy_scores, beam_scores):
        assert b >= g - 1e-4
    assert sum(b > g + 1e-3 for g, b in zip(greedy_scores, beam_scores)) > 0


# -- padding, modes, limits ---------------------------------------------------------------------


def test_padding_in_batch_does_not_change_greedy_or_beam_output(toy: Toy) -> None:
    src = toy.novel_src
    batched_greedy = greedy_decode(toy.model, src)
    batched_beam = beam_search(toy.model, src, beam_size=3)
    for i in range(src.size(0)):
        alone = src[i : i + 1, : int(src[i].ne(0).sum())]
        assert greedy_decode(toy.model, alone) == batched_greedy[i : i + 1]
        assert beam_search(toy.model, alone, beam_size=3) == batched_beam[i : i + 1]


def test_decoding_restores_training_mode_and_respects_length_limit(
    random_model: CvmTransformer,
) -> None:
    src = _random_src()
    random_model.train()
    try:
        out = greedy_decode(random_model, src, max_len_a=0.0, max_len_b=3)
        assert random_model.training
        beamed = beam_search(random_model, src, beam_size=2, max_len_a=0.0, max_len_b=3)
        assert random_model.training
    finally:
        random_model.eval()
    assert all(len(row) <= 3 for row in out + beamed)
    assert all(0 not in row and 1 not in row and EOS not in row for row in out + beamed)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_int8_quantized_toy_still_decodes(toy: Toy) -> None:
    quantized = torch.ao.quantization.quantize_dynamic(toy.model, {nn.Linear}, dtype=torch.qint8)
    out = greedy_decode(quantized, toy.train_src)
    assert beam_search(quantized, toy.train_src, beam_size=2) is not None
    correct = sum(o == s[::-1] for o, s in zip(out, toy.train_seqs))
    assert correct >= len(out) // 2
