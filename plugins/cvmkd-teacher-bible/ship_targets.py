"""Ship the teacher's translations of a recipe's training sources with the teacher package.

    python plugins/cvmkd-teacher-bible/ship_targets.py RUN_DIR
    python plugins/cvmkd-teacher-bible/ship_targets.py RUN_DIR --evaluation

With ``--evaluation``, the translations shipped are instead those of the run's validation and test
sentences, which every run with this teacher scores it on (``translations/``): the run must have
finished (its cache holds them), and later runs read them instead of decoding the teacher.

RUN_DIR is a run of a recipe with sequence-level KD from ``bible-fr-en`` (``recipes/default.toml``)
that has finished its teacher pass. The script rebuilds that run's training split and the keys
of its translations, reads the cached translations the run made (each chunk checked against its
recorded sha256), and writes them into ``cvmkd_teacher_bible/bible-fr-en/sequence-kd/`` with
``cvmkd_kd.sequence.ship_targets``, recording where, how and how fast they were made. Runs with
the same teacher, tokenizer, sources and decoding settings then use them instead of translating
(docs/recipes.md, "sequence-level KD"). Nothing is translated here and nothing is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEST = HERE / "cvmkd_teacher_bible" / "bible-fr-en"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder whose teacher pass has finished")
    parser.add_argument("--dest", type=Path, default=DEST, help=f"the teacher package (default {DEST})")
    parser.add_argument("--evaluation", action="store_true", help="ship the validation and test translations instead")
    args = parser.parse_args(argv)

    import torch

    from cvmkd_core.session import open_session, prepare_state
    from cvmkd_kd.data import prepare_data
    from cvmkd_kd.sequence import SHIPPED_SETTINGS, cache_key, chunk_files, distillation_sources, ship_targets
    from cvmkd_nmt.cache import verified_cache_file
    from cvmkd_nmt.hardware import resolve_device, resolve_precision
    from cvmkd_nmt.model.package import load_model_folder, read_metadata, resolve_package

    session = open_session(args.run / "recipe.toml")
    state = prepare_state(session, args.run)
    recipe = session.recipe
    checkpoint = recipe.section("teacher").checkpoint
    if not checkpoint:
        print(f"error: {args.run} trains its own teacher, not the one in {args.dest}", file=sys.stderr)
        return 2
    package = resolve_package(checkpoint, state.registry)
    if package.resolve() != args.dest.resolve():
        print(f"error: {args.run} distils {package}, not {args.dest}", file=sys.stderr)
        return 2
    _, tokenizer, metadata = load_model_folder(package, state.registry)
    data = prepare_data(state, tokenizer=tokenizer)
    if args.evaluation:
        return ship_evaluation(args, recipe, data, tokenizer, metadata, package)
    config = recipe.distill.config.sequence
    if config.targets == "reference":
        print(f"error: {args.run} trains on the references: no teacher translations to ship", file=sys.stderr)
        return 2
    sources, references, _, _ = distillation_sources(data.splits, config)
    device = resolve_device(recipe.run.device)
    precision = resolve_precision(recipe.run.precision, device)
    weights = metadata.get("weights_sha256") or "unknown"
    key = cache_key(weights, tokenizer.sha256, sources, references, config, f"{device}|{precision}")
    cached = recipe.run.cache_path() / "teacher-targets" / key[:24]
    if not cached.is_absolute():
        cached = Path.cwd() / cached
    info = json.loads((cached / "info.json").read_text("utf-8")) if (cached / "info.json").is_file() else {}
    lines: list[str] = []
    for _, chunk in chunk_files(cached, sources, config.chunk_size):
        if not verified_cache_file(chunk, "cached teacher translations"):
            print(f"error: {chunk} is missing: the run's teacher pass has not finished", file=sys.stderr)
            return 2
        lines.extend(chunk.read_text("utf-8").split("\n")[:-1])
    if len(lines) != len(sources):
        print(f"error: {cached} holds {len(lines)} translations for {len(sources)} sources", file=sys.stderr)
        return 2
    shipped_key = cache_key(weights, tokenizer.sha256, sources, references, config, SHIPPED_SETTINGS)
    made_with = {
        "run": str(args.run),
        "recipe": str(args.run / "recipe.toml"),
        "device": str(device),
        "precision": precision,
        "beam_size": config.beam_size,
        "nbest": config.nbest,
        "seconds": info.get("seconds"),
        "torch": torch.__version__,
        "teacher_weights_sha256": weights,
        "teacher_package_recipe_sha256": read_metadata(package).get("recipe_sha256"),
    }
    path = ship_targets(args.dest, shipped_key, lines, made_with)
    print(f"{path}: {len(lines)} translations, {path.stat().st_size / 1e6:.2f} MB")
    return 0


def ship_evaluation(
    args: argparse.Namespace, recipe: Any, data: Any, tokenizer: Any, metadata: Any, package: Path
) -> int:
    """Ship the run's cached teacher translations of its validation and test sentences."""
    import torch

    from cvmkd_kd.sequence import SHIPPED_SETTINGS, SHIPPED_TRANSLATIONS, ship_targets, translations_key
    from cvmkd_nmt.cache import verified_cache_file
    from cvmkd_nmt.hardware import resolve_device, resolve_precision
    from cvmkd_nmt.model.package import read_metadata

    device = resolve_device(recipe.run.device)
    precision = resolve_precision(recipe.run.precision, device)
    weights = metadata.get("weights_sha256") or "unknown"
    beam = recipe.section("validation").beam_size
    cache = recipe.run.cache_path() / "teacher-translations"
    if not cache.is_absolute():
        cache = Path.cwd() / cache
    for split in ("valid", "test"):
        sources = [p[0] for p in getattr(data.splits, split)]
        key = translations_key(weights, tokenizer.sha256, beam, f"{device}\n{precision}", sources)
        cached = cache / f"{key[:24]}.txt"
        if not verified_cache_file(cached, "cached teacher translations"):
            print(
                f"error: {cached} is missing: the run has not scored the teacher on its {split} split", file=sys.stderr
            )
            return 2
        lines = cached.read_text("utf-8").split("\n")[:-1]
        if len(lines) != len(sources):
            print(f"error: {cached} holds {len(lines)} translations for {len(sources)} sources", file=sys.stderr)
            return 2
        made_with = {
            "run": str(args.run),
            "recipe": str(args.run / "recipe.toml"),
            "split": split,
            "device": str(device),
            "precision": precision,
            "beam_size": beam,
            "torch": torch.__version__,
            "teacher_weights_sha256": weights,
            "teacher_package_recipe_sha256": read_metadata(package).get("recipe_sha256"),
        }
        shipped_key = translations_key(weights, tokenizer.sha256, beam, SHIPPED_SETTINGS, sources)
        path = ship_targets(args.dest, shipped_key, lines, made_with, folder_name=SHIPPED_TRANSLATIONS)
        print(f"{path}: {len(lines)} {split} translations, {path.stat().st_size / 1e3:.0f} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
