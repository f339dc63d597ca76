"""Checkpoints: one file per validated step, written atomically, listed in a checksummed manifest.

``checkpoints/manifest.json`` records each checkpoint's step, file, sha256 and score (the rank
its validation gave it). The last ``keep`` checkpoints and the best one are kept. Loading verifies the checksum;
a damaged checkpoint is reported and skipped in favour of the previous one. Payloads hold only
tensors and plain Python values, loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import re
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
        """Write the checkpoint, then the manifest that lists it, then delete the pruned ones: a
        failure at any point (a full disk, say) leaves the previous manifest and every checkpoint
        it lists intact, and is raised as a CheckpointError naming the file."""
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        data = buffer.getvalue()
        name = f"step_{step:08d}_it{iteration:08d}.pt"
        path = self.directory / name
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
        except OSError as exc:
            raise CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None
        entry = CheckpointEntry(
            step=step, iteration=iteration, file=name, sha256=hashlib.sha256(data).hexdigest(), score=score
        )
        entries = [e for e in self.entries() if e.file != name] + [entry]
        kept = self._kept(entries)
        try:
            self._write_manifest(kept)
        except OSError as exc:
            raise CheckpointError(
                f"cannot write checkpoint manifest {self.directory / MANIFEST}: {exc.strerror or exc}"
            ) from None
        for dropped in entries:
            if dropped not in kept:
                try:
                    (self.directory / dropped.file).unlink()
                except FileNotFoundError:
                    pass
        return entry

    def _kept(self, entries: list[CheckpointEntry]) -> list[CheckpointEntry]:
        """The last ``keep`` entries and the best one."""
        best = self.best(entries)
        kept = entries[-self.keep :]
        if best is not None and best not in kept:
            kept = [best, *kept]
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
        except pickle.UnpicklingError as exc:
            # torch's message spans a dozen lines; the refused global is what matters
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
            what = found.group(1) if found else "an object that is not allowed"
            raise CheckpointError(
                f"checkpoint {path} refused: it would unpickle {what}, but a checkpoint may hold only "
                "tensors and plain values (torch.load with weights_only=True)"
            ) from None
        except Exception as exc:
            message = " ".join(str(exc).split())
            raise CheckpointError(f"checkpoint {path} cannot be read: {message}") from None

    def _first_usable(self, which: str, warn: bool) -> tuple[CheckpointEntry, dict[str, Any]]:
        entries = self.entries()
        if not entries:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        order = list(reversed(entries))
        if which == "best":
            best = self.best(entries)
            assert best is not None  # entries is not empty
            order = [best] + [e for e in order if e is not best]
        problems = []
        for entry in order:
            try:
                return entry, self.load_entry(entry)
            except CheckpointError as exc:
                if warn:
                    log.warning("%s; trying an earlier checkpoint", exc)
                problems.append(str(exc))
        raise CheckpointError("no usable checkpoint: " + "; ".join(problems))

    def load(self, which: str = "last") -> tuple[CheckpointEntry, dict[str, Any]]:
        """Load the ``"last"`` or ``"best"`` checkpoint, falling back past damaged ones."""
        return self._first_usable(which, warn=True)

    def verify(self, which: str = "last") -> CheckpointEntry | None:
        """The checkpoint :meth:`load` would restore, checked by loading it, silently (``load``
        warns about the damaged ones it skips later); None when there is no checkpoint yet.
        Raises CheckpointError when the manifest is damaged or no checkpoint is usable."""
        if not self.entries():
            return None
        entry, _ = self._first_usable(which, warn=False)
        return entry
