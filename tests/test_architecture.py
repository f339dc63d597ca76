"""The layers hold: the import graph of the distributions under ``plugins/`` has no cycle, every
import of another distribution is a declared dependency, and the core stays free of the
translation domain's words (docs/architecture.md draws the graph)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
CORE = "cvmkd"


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def distributions() -> dict[str, tuple[list[Path], set[str]]]:
    """Each distribution of this repository: its package folders and its declared dependencies,
    optional ones (extras) included."""
    found = {CORE: ([ROOT / "cvmkd_core"], _dependencies(_project(ROOT)))}
    for pyproject in sorted(ROOT.glob("plugins/*/pyproject.toml")):
        project = _project(pyproject.parent)
        packages = [p for p in pyproject.parent.glob("cvmkd_*") if p.is_dir() and not p.name.endswith("egg-info")]
        found[_name(project["name"])] = (packages, _dependencies(project))
    return found


def _dependencies(project: dict) -> set[str]:
    extras = [d for group in project.get("optional-dependencies", {}).values() for d in group]
    return {_name(d) for d in [*project.get("dependencies", []), *extras]}


def _project(folder: Path) -> dict:
    return tomllib.loads((folder / "pyproject.toml").read_text("utf-8"))["project"]


def import_graph() -> dict[str, dict[str, list[str]]]:
    """``{distribution: {imported distribution: [where, ...]}}`` over every module of each
    distribution's packages (tests excluded), imports inside functions included."""
    dists = distributions()
    owner = {package.name: dist for dist, (packages, _) in dists.items() for package in packages}
    graph: dict[str, dict[str, list[str]]] = {dist: {} for dist in dists}
    for dist, (packages, _) in dists.items():
        for package in packages:
            for path in sorted(package.rglob("*.py")):
                for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
                    if isinstance(node, ast.Import):
                        modules = [alias.name for alias in node.names]
                    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                        modules = [node.module]
                    else:
                        continue
                    for module in modules:
                        target = owner.get(module.split(".")[0])
                        if target is not None and target != dist:
                            where = f"{path.relative_to(ROOT)}:{node.lineno}"
                            graph[dist].setdefault(target, []).append(where)
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle of the graph, as the path that closes it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, {})):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_distribution_imports_one_it_does_not_declare() -> None:
    dists = distributions()
    undeclared = [
        f"{dist} imports {target} ({', '.join(places[:2])}) but does not depend on it"
        for dist, targets in import_graph().items()
        for target, places in sorted(targets.items())
        if target not in dists[dist][1]
    ]
    assert undeclared == []


def test_the_import_graph_has_no_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_core_imports_no_plugin() -> None:
    assert import_graph()[CORE] == {}


def test_the_cycle_finder_finds_a_cycle_and_only_one() -> None:
    assert find_cycle({"a": {"b": []}, "b": {"c": []}, "c": {}}) is None
    assert find_cycle({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}}) == ["a", "b", "c", "a"]


#: words of the translation domain that the core must not speak
DOMAIN_WORDS = (
    "translat",
    "bleu",
    "chrf",
    "teacher",
    "student",
    "corpus",
    "corpora",
    "tokeniz",
    "tokenis",
    "vocab",
    "sentence",
    "distil",
    "quantiz",
    "composite",
    "gate",
    "metric",
)

#: what the core still says of the domain, per word: a ratchet. A new occurrence fails; when
#: one is removed, lower its count here (the test says which).
DOMAIN_WORDS_LEFT = {
    "translat": 1,
    "bleu": 0,
    "chrf": 0,
    "teacher": 0,
    "student": 0,
    "corpus": 0,
    "corpora": 0,
    "tokeniz": 0,
    "tokenis": 0,
    "vocab": 0,
    "sentence": 0,
    "distil": 3,
    "quantiz": 0,
    "composite": 0,
    "gate": 0,
    "metric": 3,
}


def domain_words() -> dict[str, int]:
    text = "\n".join(p.read_text("utf-8").lower() for p in sorted((ROOT / "cvmkd_core").rglob("*.py")))
    return {word: len(re.findall(rf"\b{word}", text)) for word in DOMAIN_WORDS}


def test_the_core_speaks_no_more_of_the_domain_than_it_did() -> None:
    found = domain_words()
    grown = {w: f"{DOMAIN_WORDS_LEFT[w]} -> {n}" for w, n in found.items() if n > DOMAIN_WORDS_LEFT[w]}
    assert grown == {}, "domain words new in cvmkd_core/ (they belong in a plugin)"
    shrunk = {w: f"{DOMAIN_WORDS_LEFT[w]} -> {n}" for w, n in found.items() if n < DOMAIN_WORDS_LEFT[w]}
    assert shrunk == {}, "fewer domain words in cvmkd_core/: lower DOMAIN_WORDS_LEFT to match"


@pytest.mark.parametrize("word", ["teacher", "bleu"])
def test_the_domain_word_count_sees_a_new_word(word: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    core = tmp_path / "cvmkd_core"
    core.mkdir()
    for path in (ROOT / "cvmkd_core").rglob("*.py"):
        (core / path.relative_to(ROOT / "cvmkd_core")).parent.mkdir(parents=True, exist_ok=True)
        (core / path.relative_to(ROOT / "cvmkd_core")).write_text(path.read_text("utf-8"), "utf-8")
    (core / "new.py").write_text(f"# the {word.upper()} of a run\n", "utf-8")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert domain_words()[word] == DOMAIN_WORDS_LEFT[word] + 1


def test_the_picture_in_the_architecture_doc_is_the_declared_graph() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text("utf-8")
    block = text.split("```mermaid", 1)[1].split("```", 1)[0]
    names: dict[str, str] = {}
    drawn: set[tuple[str, str, bool]] = set()
    for line in block.splitlines():
        for node, label in re.findall(r"(\w+)\[([\w-]+)\]", line):
            names[node] = label
        edge = re.match(r"\s*(\w+)(?:\[[\w-]+\])?\s*(-->|-\.->)\s*(\w+)", line)
        if edge:
            drawn.add((edge.group(1), edge.group(3), edge.group(2) == "-.->"))
    edges = {(names[a], names[b], optional) for a, b, optional in drawn}
    dists = distributions()
    declared = set()
    for dist in dists:
        project = _project(ROOT if dist == CORE else ROOT / "plugins" / dist)
        required = {_name(d) for d in project.get("dependencies", [])} & set(dists)
        optional = _dependencies(project) & set(dists) - required
        if dist != CORE:
            others = required - {CORE}
            # the core is drawn only for distributions with no other dependency in the repository
            declared |= {(dist, target, False) for target in (others or {CORE})}
            declared |= {(dist, target, True) for target in optional}
    assert edges == declared
