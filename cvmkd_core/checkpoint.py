"""Checkpoints: one file per validated step, written atomically, listed in a checksummed manifest.

``checkpoints/manifest.json`` records each checkpoint's step, file, sha256 and composite
score. The last ``keep`` checkpoints and the best one are kept. Loading verifies the checksum;
a damaged checkpoint is reported and skipped in favour of the previous one. Payloads hold only
tensors and plain Python values, loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import attrs
import torch

from cvmkd_core.errors import CheckpointError
from cvmkd_core.files import atomic_write_bytes, atomic_write_json, sha256_file

log = logging.getLogger("cvmkd")

MANIFEST = "manifest.json"


@attrs.define
class CheckpointEntry:
    step: int
    iteration: int
    file: str
    sha256: str
    score: float | None = None


class CheckpointStore:
    """The checkpoints of one run directory."""

    def __init__(self, directory: Path, keep: int = 2) -> None:
        self.directory = directory
        self.keep = keep

    # --- manifest -------------------------------------------------------------------------------

    def entries(self) -> list[CheckpointEntry]:
        path = self.directory / MANIFEST
        if not path.exists():
            return []
        try:
            data = json.loads(path.read_text("utf-8"))
            return [CheckpointEntry(**e) for e in data["checkpoints"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: damaged checkpoint manifest ({exc})") from None

    def _write_manifest(self, entries: list[CheckpointEntry]) -> None:
        best = self.best(entries)
        atomic_write_json(
            self.directory / MANIFEST,
            {
                "checkpoints": [attrs.asdict(e) for e in entries],
                "best": best.file if best else None,
            },
        )

    @staticmethod
    def best(entries: list[CheckpointEntry]) -> CheckpointEntry | None:
        scored = [e for e in entries if e.score is not None]
        if not scored:
            return entries[-1] if entries else None
        # the earliest of equal scores: later ones brought nothing new
        return max(scored, key=lambda e: (e.score, -e.step))

    # --- save / load ----------------------------------------------------------------------------

    def save(self, step: int, iteration: int, payload: dict[str, Any], score: float | None) -> CheckpointEntry:
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        data = buffer.getvalue()
        name = f"step_{step:08d}_it{iteration:08d}.pt"
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.directory / name, data)
        entry = CheckpointEntry(
            step=step, iteration=iteration, file=name, sha256=hashlib.sha256(data).hexdigest(), score=score
        )
        entries = [e for e in self.entries() if e.file != name] + [entry]
        entries = self._prune(entries)
        self._write_manifest(entries)
        return entry

    def _prune(self, entries: list[CheckpointEntry]) -> list[CheckpointEntry]:
        best = self.best(entries)
        kept = entries[-self.keep :]
        if best is not None and best not in kept:
            kept = [best, *kept]
        for entry in entries:
            if entry not in kept:
                try:
                    (self.directory / entry.file).unlink()
                except FileNotFoundError:
                    pass
        return kept

    def load_entry(self, entry: CheckpointEntry) -> dict[str, Any]:
        path = self.directory / entry.file
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} is missing")
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise CheckpointError(f"checkpoint {path} is damaged (sha256 mismatch)")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from None

    def load(self, which: str = "last") -> tuple[CheckpointEntry, dict[str, Any]]:
        """Load the ``"last"`` or ``"best"`` checkpoint, falling back past damaged ones."""
        entries = self.entries()
        if not entries:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        order = list(reversed(entries))
        if which == "best":
            best = self.best(entries)
            order = [best] + [e for e in order if e is not best]
        problems = []
        for entry in order:
            try:
                return entry, self.load_entry(entry)
            except CheckpointError as exc:
                log.warning("%s; trying an earlier checkpoint", exc)
                problems.append(str(exc))
        raise CheckpointError("no usable checkpoint: " + "; ".join(problems))
