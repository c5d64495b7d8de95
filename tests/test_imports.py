"""The package's import structure, read from the source (ast), against the declared layer order.

Layers, lowest first (docs/ARCHITECTURE.md, "Import order"): a module imports only from its own layer or below,
and no set of modules imports itself around a cycle, counting imports inside functions too (a lazy import is
still a dependency). Third-party libraries are imported at the top of a module, except heavy or optional runtimes,
which are imported only where they are needed.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "lorafast_export"

LAYERS = [
    {
        "errors",
        "specs",
        "paths",
        "qform",
        "textdata",
        "dtypes",
        "safeio",
    },  # leaves: names, data, safe file I/O
    {
        "recipe",
        "manifest",
        "stagecache",
        "outdir",
    },  # the recipe schema, the manifest, the stage cache, out dirs
    {
        "weights",
        "checkpoint",
        "model",
        "adapters",
        "staging",
    },  # reading checkpoints and adapters; the canonical decoder; pinned host-GPU copies
    {"merge", "quant", "runtime"},  # the math and its streaming: merge, quantize, the paged torch runtime
    {"report", "validate", "targets"},  # lowering to runtimes, validation, reports
    {"pipeline", "matrix", "inspection", "verify", "generate"},  # orchestration
    {"cli", "testing"},  # entry point; test/bench helpers (nothing in the package imports them)
]
# Third-party modules that may be imported inside a function (every other third-party module: at the top of the
# module; the standard library may be imported anywhere, it costs nothing and hides no dependency):
# optional or heavy runtimes, loaded only when the code path that needs them runs, and the libraries that
# `lorafast-export --help` and reading a recipe must not pay for (torch alone takes seconds to import).
LAZY_OK = {
    "onnxruntime",
    "onnxruntime_genai",
    "onnx",
    "onnx_ir",
    "openvino",
    "openvino_genai",
    "openvino_tokenizers",
    "tensorrt_llm",
    "triton",
    "torch",
    "transformers",
    "peft",
    "safetensors",
    "rich",
    "tqdm",  # not a dependency: cli._no_tqdm_bars silences the bars of the libraries that bring it
}
# Optional runtimes (extras): only the target package that lowers to them may import them.
RUNTIME_HOME = {
    "onnxruntime": "targets.onnxruntime",
    "onnxruntime_genai": "targets.onnxruntime",
    "onnx": "targets.onnxruntime",
    "onnx_ir": "targets.onnxruntime",
    "openvino": "targets.openvino",
    "openvino_genai": "targets.openvino",
    "openvino_tokenizers": "targets.openvino",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PKG.rglob("*.py"))}


MODULES = _modules()


def _imports(tree: ast.Module):
    """(imported module, at top level?, line) for every import in the file."""
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, id(node) in top, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, id(node) in top, node.lineno
            for a in node.names:  # `from pkg import submodule` imports the submodule
                if f"{node.module}.{a.name}" in MODULES:
                    yield f"{node.module}.{a.name}", id(node) in top, node.lineno


def _internal_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for m, tree in MODULES.items():
        for name, _, _ in _imports(tree):
            if name in MODULES and name != m:
                edges[m].add(name)
    return edges


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) == 1:
        return -1  # lorafast_export itself (__version__)
    return next((i for i, names in enumerate(LAYERS) if parts[1] in names), None)


def test_every_module_has_a_layer():
    assert [m for m in MODULES if _layer(m) is None] == []


def test_no_upward_import():
    upward = [
        f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
        for m, deps in _internal_edges().items()
        for d in sorted(deps)
        if _layer(d) > _layer(m)
    ]
    assert upward == []


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(edges)))
    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert _cycles(_internal_edges()) == []


def test_the_cycle_finder_finds_cycles():
    """The check above can fail: a made-up graph with a cycle through three modules is caught."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_function_level_third_party_imports_are_only_heavy_or_optional_runtimes():
    lazy = [
        f"{m}:{line} imports {name} inside a function"
        for m, tree in MODULES.items()
        for name, top, line in _imports(tree)
        if not top
        and not name.startswith("lorafast_export")
        and name.split(".")[0] not in LAZY_OK
        and name.split(".")[0] not in sys.stdlib_module_names
    ]
    assert lazy == []


@pytest.mark.parametrize("runtime", sorted(RUNTIME_HOME))
def test_optional_runtimes_are_imported_only_by_their_target(runtime):
    home = f"lorafast_export.{RUNTIME_HOME[runtime]}"
    outside = [
        f"{m}:{line}"
        for m, tree in MODULES.items()
        for name, _, line in _imports(tree)
        if name.split(".")[0] == runtime and not (m == home or m.startswith(home + "."))
    ]
    assert outside == []


def test_tests_and_bench_do_not_import_each_other():
    root = PKG.parent
    bad = []
    for folder, forbidden in (("tests", "bench"), ("bench", "tests")):
        for p in sorted((root / folder).rglob("*.py")):
            for name, _, line in _imports(ast.parse(p.read_text(), str(p))):
                if name.split(".")[0] == forbidden:
                    bad.append(f"{p.relative_to(root)}:{line} imports {name}")
    assert bad == []
