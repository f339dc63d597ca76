"""Small components for testing plugins and the loop without a translation model.

``ToyPlugin`` registers a trainer ``toy`` (fits one weight by SGD; its "translation" is exact
while the weight is near its target and garbage otherwise) and a metric ``exact`` (share of
hypotheses equal to their reference). Register it for one test and unregister it after::

    plugins = build_plugins()
    plugins.add_plugin(ToyPlugin(), name="toy")
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs
import torch

from cvmkd_core.config import ge, gt
from cvmkd_core.hookspecs import hookimpl
from cvmkd_core.registry import Registrar
from cvmkd_core.stash import NamedStash, StashKey
from cvmkd_core.state import RunState, StepResult
from cvmkd_validation.contract import TranslationTrainer
from cvmkd_validation.metrics import ScoreSpec

#: the toy trainer's part of a checkpoint
TOY_STATE: StashKey[dict[str, Any]] = StashKey("toy")

#: A recipe for the toy trainer: six steps, validated every three.
TOY_RECIPE = """
[run]
name = "toy"
steps = 6
validate_every = 3

[distill]
name = "toy"

[validation]
metrics = ["exact"]
"""

#: A hook file that registers the toy components, for ``--plugin``.
TOY_HOOK_FILE = """
from cvmkd_core import hookimpl
from cvmkd_testing import ToyPlugin

_toy = ToyPlugin()


@hookimpl
def cvmkd_register(register):
    _toy.cvmkd_register(register)
"""

TOY_SENTENCES = ["in the beginning", "god created", "the heavens and the earth", "and the earth was"]


@attrs.frozen
class ToyConfig:
    learning_rate: float = attrs.field(default=0.05, validator=gt(0))
    target: float = 3.0
    sabotage_at_step: int = attrs.field(default=0, validator=ge(0))
    """when > 0, the weight is thrown far off after this step (for rollback tests)"""


class ToyTrainer(TranslationTrainer):
    """Fit ``w`` to ``target`` on random inputs; translate exactly while ``|w - target| < 0.5``.
    It has no test split, so a toy run ends without a test evaluation."""

    def __init__(self, config: ToyConfig) -> None:
        self.config = config
        self.weight = torch.zeros(1)
        self.position = 0
        self.sabotaged = False

    def _batches(self) -> Iterator[torch.Tensor]:
        while True:
            generator = torch.Generator().manual_seed(self.position)
            self.position += 1
            yield torch.randn(8, generator=generator)

    @hookimpl
    def cvmkd_setup(self, state: RunState) -> None:
        torch.manual_seed(state.recipe.run.seed)
        self.weight = torch.zeros(1)
        state.batches = self._batches()
        state.objects["weight"] = self.weight

    @hookimpl(trylast=True)
    def cvmkd_step(self, state: RunState, batch: torch.Tensor) -> StepResult:
        w = self.weight.clone().requires_grad_(True)
        loss = ((w * batch - self.config.target * batch) ** 2).mean()
        loss.backward()
        lr = self.config.learning_rate * state.lr_scale
        with torch.no_grad():
            self.weight -= lr * w.grad  # type: ignore[operator]
        if self.config.sabotage_at_step and state.step + 1 == self.config.sabotage_at_step and not self.sabotaged:
            self.sabotaged = True
            self.weight += 100.0
        return StepResult(loss=loss.item(), metrics={"weight": float(self.weight), "lr": lr})

    @hookimpl
    def cvmkd_checkpoint(self, state: RunState, payload: NamedStash) -> None:
        payload[TOY_STATE] = {"weight": self.weight.clone(), "position": self.position}

    @hookimpl
    def cvmkd_restore(self, state: RunState, payload: NamedStash, reason: str) -> None:
        self.weight.copy_(payload[TOY_STATE]["weight"])
        self.position = int(payload[TOY_STATE]["position"])
        state.batches = self._batches()

    def validation_data(self, state: RunState) -> tuple[list[str], list[str]]:
        return list(TOY_SENTENCES), list(TOY_SENTENCES)

    def translate(self, state: RunState, sources: list[str], beam_size: int = 1) -> list[str]:
        good = abs(float(self.weight) - self.config.target) < 0.5
        return [s if good else "garbage" for s in sources]

    def teacher_translations(self, state: RunState, sources: list[str], beam_size: int = 1) -> list[str]:
        """The toy's teacher is perfect."""
        return list(sources)


class ExactMatch:
    """Share of hypotheses identical to their reference, in percent."""

    scores = {"exact": ScoreSpec(True, 0.0, 100.0, "share of hypotheses equal to their reference")}

    def score(self, hypotheses: list[str], references: list[str], sources: list[str]) -> dict[str, float]:
        same = sum(h == r for h, r in zip(hypotheses, references))
        return {"exact": 100.0 * same / max(len(references), 1)}


class ToyPlugin:
    """Registers the ``toy`` trainer and the ``exact`` metric."""

    @hookimpl
    def cvmkd_register(self, register: Registrar) -> None:
        register.trainer("toy", ToyTrainer, config=ToyConfig)
        register.metric("exact", ExactMatch)


# --- a tiny real distillation, for tests of trainers, quantizers and detectors ------------------

#: French→English word pairs of a made-up corpus that a tiny model learns in seconds.
TINY_WORDS = {
    "le": "the",
    "chat": "cat",
    "chien": "dog",
    "mange": "eats",
    "voit": "sees",
    "petit": "small",
    "grand": "big",
    "oiseau": "bird",
    "poisson": "fish",
    "un": "a",
}


def write_tiny_corpus(directory: Any, pairs: int = 120, seed: int = 0) -> Any:
    """Write ``corpus.tsv`` (2-6 word sentences, word-for-word translations) into ``directory``."""
    import random
    from pathlib import Path

    rng = random.Random(seed)
    lines = []
    for _ in range(pairs):
        src = [rng.choice(list(TINY_WORDS)) for _ in range(rng.randint(2, 6))]
        lines.append(" ".join(src) + "\t" + " ".join(TINY_WORDS[w] for w in src))
    path = Path(directory) / "corpus.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


#: A whole distillation on ``corpus.tsv``: a 10-step teacher, a 12-step student validated every
#: 6 steps; tests append their own sections (``[[quantize]]``, ``[guard]``...).
TINY_KD_RECIPE = """
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
"""


def toy_plugin_manager() -> Any:
    """A plugin manager with the built-ins, the validation plugins (validation, error analysis,
    test evaluation) and the toy trainer and metric, and no other entry points."""
    import cvmkd_validation.analysis
    import cvmkd_validation.evaluation
    import cvmkd_validation.validation
    from cvmkd_core.plugins import build_plugins

    plugins = build_plugins(entry_points=False)
    for module in (cvmkd_validation.validation, cvmkd_validation.analysis, cvmkd_validation.evaluation):
        plugins.add_plugin(module, name=module.__name__.rsplit(".", 1)[-1], source="test")
    plugins.add_plugin(ToyPlugin(), name="toy", source="test")
    return plugins
