"""The house rules, checked on the source: imports go down the stages, no cycles, no reaching into
another module's private names, small modules and functions.

Function-level imports count as edges too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "retrieval"

# Lowest first. A module may import its own package and any package listed before its own.
LAYERS = ["core", "sources", "encoders", "embed", "index", "store", "asif", "api", "eval", "serve", "cli"]

MAX_MODULE_LINES = 420  # "about 400"
MAX_FUNCTION_LINES = 60  # counted from the first statement of the body: ruff puts each parameter on a line of its own
MAX_PARAMETERS = 8  # self and cls not counted; more travel in an options dataclass (BuildOptions, EvalOptions, ...)

# Private attributes of third-party objects that we must touch, each with its reason.
THIRD_PARTY_PRIVATE = {
    "_is_mkldnn_bf16_supported": "torch has no public probe for bfloat16 support on the CPU",
    "_fc": "efficientnet_lite_pytorch names its classifier head _fc",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(path): ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(modules: dict[str, ast.Module]) -> dict[str, set[tuple[str, tuple[str, ...]]]]:
    """module -> {(imported retrieval module, names imported from it)}, every import in the file."""
    graph: dict[str, set[tuple[str, tuple[str, ...]]]] = {}
    for name, tree in modules.items():
        is_package = (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges |= {(alias.name, ()) for alias in node.names if alias.name.startswith("retrieval")}
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(name, is_package, node)
                if not target.startswith("retrieval"):
                    continue
                names = tuple(alias.name for alias in node.names)
                submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
                edges |= {(sub, ()) for sub in submodules}
                edges.add((target, tuple(n for n in names if f"{target}.{n}" not in modules)))
        graph[name] = edges
    return graph


MODULES = _modules()
GRAPH = _imports(MODULES)


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_subpackage_has_a_layer() -> None:
    packages = {path.parent.name for path in PACKAGE.rglob("__init__.py") if path.parent != PACKAGE}
    assert packages == set(LAYERS)
    assert [m for m in MODULES if _layer(m) is None] == ["retrieval"]


def test_imports_go_down_the_stages() -> None:
    upward = []
    for importer, edges in GRAPH.items():
        own = _layer(importer)
        for target, _ in edges:
            theirs = _layer(target)
            if own is not None and (theirs is None or theirs > own):
                upward.append(f"{importer} -> {target}")
    assert upward == []


def test_no_import_cycles() -> None:
    graph = {m: {t for t, _ in edges if t in MODULES and t != m} for m, edges in GRAPH.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_cycle_detection_finds_a_planted_cycle() -> None:
    """The walker sees function-level imports: a cycle hidden in a function body is found."""
    a = ast.parse("def f():\n    from retrieval.core import b\n")
    b = ast.parse("from retrieval.core.a import x\n")
    graph = _imports({"retrieval.core.a": a, "retrieval.core.b": b})
    assert ("retrieval.core.b", ()) in graph["retrieval.core.a"]
    assert ("retrieval.core.a", ("x",)) in graph["retrieval.core.b"]


def test_no_module_imports_another_modules_private_names() -> None:
    reached = [
        f"{importer} imports {target}.{n}"
        for importer, edges in GRAPH.items()
        for target, names in edges
        for n in names
        if target != importer and n.startswith("_") and not n.startswith("__")
    ]
    assert reached == []


def test_no_module_touches_private_attributes_of_other_objects() -> None:
    touched = []
    for module, tree in MODULES.items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if node.attr not in THIRD_PARTY_PRIVATE:
                touched.append(f"{module}:{node.lineno} {ast.unparse(node)}")
    assert touched == []


def _body_lines(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement of the body (a docstring counts) to the end of the function."""
    return (function.end_lineno or function.lineno) - function.body[0].lineno + 1


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_and_functions_are_small(module: str) -> None:
    tree = MODULES[module]
    lines = max((getattr(n, "end_lineno", 0) or 0) for n in ast.walk(tree))
    assert lines <= MAX_MODULE_LINES, f"{module}: {lines} lines"
    long = [
        f"{n.name}: {_body_lines(n)} lines"
        for n in ast.walk(tree)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and _body_lines(n) > MAX_FUNCTION_LINES
    ]
    assert long == [], module


def _wide_functions(tree: ast.Module, module: str) -> list[str]:
    """Functions of ``tree`` with more than MAX_PARAMETERS parameters (``*args`` and ``**kwargs`` count one each)."""
    wide = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            named = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg) if a]
            count = len([name for name in named if name not in ("self", "cls")])
            if count > MAX_PARAMETERS:
                wide.append(f"{module}:{node.lineno} {node.name}: {count} parameters")
    return wide


def test_functions_take_at_most_eight_parameters() -> None:
    """A long parameter list is a set of options waiting for a name: group them in a dataclass."""
    assert [line for module, tree in MODULES.items() for line in _wide_functions(tree, module)] == []


def test_parameter_count_finds_a_planted_wide_function() -> None:
    """Nested functions and methods count too; self and cls do not, *args and **kwargs do."""
    tree = ast.parse(
        "class A:\n"
        "    def fine(self, a, b, c, d, e, f, g, h): ...\n"
        "    def wide(self, a, b, c, d, e, f, g, *h, **i): ...\n"
        "def outer():\n"
        "    def inner(a, b, c, d, e, f, g, h, /, i=1): ...\n"
    )
    assert _wide_functions(tree, "m") == ["m:3 wide: 9 parameters", "m:5 inner: 9 parameters"]


def _flags_in_messages(tree: ast.Module, module: str) -> list[str]:
    """Strings of ``tree`` (docstrings aside) that name a command-line flag such as ``--target-recall``."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
    }
    return [
        f"{module}:{node.lineno} {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
        if re.search(r"(?<![\w-])--[a-z]", node.value)
    ]


def test_library_messages_name_parameters_not_flags() -> None:
    """A Python caller never typed ``--decode``: below the CLI, messages name the parameter or option field
    (``EmbedOptions.decode``, in backticks); the CLI turns those into its flags (``retrieval.cli.common.FLAGS``)."""
    found = [
        line
        for module, tree in MODULES.items()
        if not module.startswith("retrieval.cli")
        for line in _flags_in_messages(tree, module)
    ]
    assert found == []


def test_flag_scan_finds_a_planted_flag() -> None:
    tree = ast.parse('"""A docstring may say --images."""\ndef f():\n    raise ValueError(f"give --images {1}")\n')
    assert _flags_in_messages(tree, "m") == ["m:3 'give --images '"]


def test_only_the_cli_changes_warning_filters() -> None:
    """Warning filters are process-wide and ``catch_warnings`` is not thread-safe: the library leaves them alone."""
    changing = {"catch_warnings", "simplefilter", "filterwarnings", "resetwarnings"}
    found = [
        f"{module}:{node.lineno}"
        for module, tree in MODULES.items()
        if not module.startswith("retrieval.cli")
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in changing
    ]
    assert found == []
