"""What a model package records about the run that made it, stamped once the run has finished.

A package is written by the trainer (and each quantized variant by the quantization step)
during ``cvmkd_finalize``, but some of what a user needs to trust it is only known after every
finalize hook has run: the retention gate's verdict, the run's final status and wall time. The
loop therefore calls :func:`stamp_packages` after ``cvmkd_finalize``; it merges into each
package's ``metadata.json`` the fields listed in ``docs/outputs.md`` (the weights are not touched,
so their recorded sha256 stays valid).
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import attrs
import torch

from cvmkd_core import __version__
from cvmkd_core.state import FAILED_IN

log = logging.getLogger("cvmkd")


@functools.lru_cache(maxsize=1)
def source_revision() -> dict[str, Any] | None:
    """The git revision of the cvmkd source in use, when it runs from a git checkout (an
    editable install); ``None`` for an installed wheel, where the version says it all."""
    # the checkout holding this plugin (an editable install of plugins/cvmkd-nmt lives two
    # folders below it): the nearest folder above with .git that is cvmkd's own (cvmkd_core/)
    here = Path(__file__).resolve()
    root = next((p for p in here.parents if (p / ".git").exists()), None)
    if root is None or not (root / "cvmkd_core").is_dir():
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "modified": bool(dirty)} if commit else None


def plugin_versions(plugins: Any) -> dict[str, str]:
    """``{distribution: version}`` of every plugin loaded from an entry point, plus hook files."""
    versions: dict[str, str] = {}
    for info in getattr(plugins, "infos", {}).values():
        if info.error:
            continue
        if info.distribution:
            versions[info.distribution] = info.version or "unknown"
        elif info.source == "file":  # a --plugin hook file: its path is all there is to say
            versions[info.name] = f"file {info.module}"
    return dict(sorted(versions.items()))


def _gate_for(gate: Any, model: str) -> dict[str, Any] | None:
    if not isinstance(gate, dict):
        return None
    checks = [c for c in gate.get("checks", []) if c.get("model") == model]
    return {
        "passed": all(c.get("passed") for c in checks) if checks else None,
        "run_passed": gate.get("passed"),
        "threshold": gate.get("threshold"),
        "checks": checks,
        "verdict": gate.get("verdict"),
    }


def stamp_packages(state: Any, summary: Any, plugins: Any, evaluation: Any = None, gate: Any = None) -> list[Path]:
    """Merge the run's provenance and outcome into every package the run wrote (the outputs
    named ``model`` and ``model-*``); returns the packages stamped. ``evaluation`` (split,
    scores and retention by model) and ``gate`` (an attrs record of the retention gate) are the
    run's test evaluation and verdict, when it has them. A package that cannot be read is left as
    it is and named in a warning."""
    from cvmkd_core.files import atomic_write_json
    from cvmkd_nmt.hardware import describe_hardware
    from cvmkd_nmt.model.package import METADATA

    run = {
        "name": state.recipe.run.name,
        "directory": str(state.run_dir),
        "status": summary.status,
        "final_step": summary.final_step,
        "iterations_executed": summary.iterations_executed,
        "rollbacks": summary.rollbacks,
        "wall_seconds": summary.wall_seconds,
    }
    common = {
        "cvmkd_version": __version__,
        "plugins": plugin_versions(plugins),
        "source_revision": source_revision(),
        "recipe": state.recipe.to_dict(),
        "recipe_sha256": state.recipe.sha256(),
        "run": run,
    }
    stamped: list[Path] = []
    student_meta: dict[str, Any] = {}
    packages = sorted(
        (key, Path(path)) for key, path in summary.outputs.items() if key == "model" or key.startswith("model-")
    )
    # the fp32 student first: its teacher and corpus identity are shared with every variant
    for key, directory in sorted(packages, key=lambda kp: kp[0] != "model"):
        path = directory / METADATA
        if not path.is_file() and (directory / EXPORT_METADATA).is_file():
            path = directory / EXPORT_METADATA  # an export (CTranslate2): its copy of the metadata
        try:
            meta = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("could not stamp the model package %s: %s", directory, exc)
            continue
        if key == "model":
            student_meta = meta
            meta.setdefault("quantization", {"scheme": "none", "bits": 32})
            if evaluation is not None:
                role = meta.get("role", "student")
                meta["split"] = evaluation.split
                if role in evaluation.scores:
                    meta["test_scores"] = evaluation.scores[role]
                if role != "teacher" and "teacher" in evaluation.scores:
                    meta["teacher_test_scores"] = evaluation.scores["teacher"]
                    meta["retention"] = evaluation.retention
        else:
            for shared in ("teacher", "corpus", "hardware", "parameters"):
                if shared in student_meta and shared not in meta:
                    meta[shared] = student_meta[shared]
        meta.update(common)
        meta["status"] = summary.status
        if summary.status in ("failed", "interrupted"):
            # a package of a run whose finalize failed: it claims no results it does not have
            meta["error"] = summary.error
            meta["failed_in"] = summary.extra.get(FAILED_IN, None)
        meta.setdefault("hardware", describe_hardware(torch.device("cpu")))
        gate_name = "student" if key == "model" else key[len("model-") :]
        verdict = _gate_for(attrs.asdict(gate) if gate is not None else None, gate_name)
        if verdict is not None:
            meta["gate"] = verdict
        atomic_write_json(path, meta)
        stamped.append(directory)
    return stamped


#: where an export folder (``cvmkd export``, ``[[exports]]``) keeps the package's metadata
EXPORT_METADATA = "cvmkd.json"

__all__ = ["plugin_versions", "source_revision", "stamp_packages"]
