"""The package layout keeps its promises: the folder list reads as the pipeline, imports point only
from later stages to earlier ones, no import cycles, no module over 400 lines, no module named like a
standard-library module.

Imports are read from the source (ast), so this test imports nothing from lorakit. Every import
counts, also those inside functions (lazy imports of heavy parts); only imports under
`if TYPE_CHECKING:` are left out, since they are never executed.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "lorakit"
MAX_LINES = 400

# Each unit (a top-level module or a package under lorakit/) may import only itself and the units
# before it. The stages read in pipeline order; `plan` predicts what `train` will need, and `train`
# comes after `evaluate` because generation-based validation scores generations during training.
# A new top-level module goes where its imports put it: the `pipeline` spine (prepare a config,
# load a run) uses models, prompting and data, and inference, plan and train use it.
ORDER = [
    "_version",  # the version string alone
    "errors",  # the exception tree
    "files",  # atomic writes, sha256, the cache folder, wide encodings
    "config",  # the typed config: sections, defaults, field checks
    "config_reference",  # docs/config.md from the config schema
    "config_loading",  # YAML < --set, validated at once
    "runs",  # the run folder: paths, checkpoints, staging and publish
    "data",  # files -> canonical Example, clean, split
    "prompting",  # templates, encoding, collation
    "run_metadata",  # lorakit.json written and read back (holds a Template)
    "models",  # base model + tokenizer, precision, LoRA, base identity
    "pipeline",  # the spine: prepare(config) and load_run(folder), shared by every entry point
    "inference",  # Predictor, batched and streaming decoding
    "evaluate",  # metrics, answers, perplexity, runner, report
    "plan",  # shape, memory, devices, fitting
    "train",  # the recipe, its arguments, callbacks, generation-based validation
    "export",  # merge + verify
    "serve",  # the OpenAI-compatible app
    "demo",  # the offline end-to-end demo
    "inspection",  # `lorakit data inspect`
    "cli_commands",  # the printing commands
    "cli",  # the command line
    "__init__",  # the public API
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _unit(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return skipped


def _imports(module: str, path: Path) -> set[str]:
    """The lorakit modules `module` imports (a `from x import name` counts as x.name when that is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_nodes(tree)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def test_every_unit_is_in_the_declared_order():
    units = {_unit(module) for module in MODULES}
    assert units <= set(ORDER), f"add {sorted(units - set(ORDER))} to ORDER in tests/test_layout.py"


def test_imports_point_only_to_earlier_stages():
    rank = {unit: i for i, unit in enumerate(ORDER)}
    wrong = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        for target in sorted(targets)
        if rank[_unit(target)] > rank[_unit(module)]
    ]
    assert not wrong, "a stage imports a later one:\n" + "\n".join(wrong)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_cycles_between_packages():
    units: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        units.setdefault(_unit(module), set()).update(_unit(t) for t in targets if _unit(t) != _unit(module))
    cycle = _cycle(units)
    assert cycle is None, " -> ".join(cycle)


def test_no_import_cycles_between_modules():
    cycle = _cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle)


def test_no_module_over_400_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these along a seam (at most {MAX_LINES} lines): {long}"


def test_no_module_named_like_the_standard_library():
    shadowing = sorted(m for m in MODULES if m.rsplit(".", 1)[-1] in sys.stdlib_module_names)
    assert not shadowing, shadowing


@pytest.mark.parametrize(
    "cut",
    [
        ("lorakit.errors", "lorakit.config"),
        ("lorakit.data.formats", "lorakit.prompting.templates"),
    ],
)
def test_the_checks_see_a_backward_arrow(cut, monkeypatch):
    """The order check fails on an import that points to a later stage (guards the checker itself)."""
    module, target = cut
    monkeypatch.setitem(GRAPH, module, GRAPH[module] | {target})
    with pytest.raises(AssertionError, match="a stage imports a later one"):
        test_imports_point_only_to_earlier_stages()


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
