"""The package's shape, read from the source with ast (nothing is imported): imports only go down the layers of README
"Architecture", modules, classes and functions stay small, public names have a docstring, and private names stay in
their module."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "dmm_wrap"

# A module may import modules of its own rank or lower ones, never higher ones (lazy imports inside functions too).
# A key names a module and, for a package, everything under it; the root package ("dmm_wrap", i.e. its __init__.py)
# matches only itself.
RANKS: dict[str, int] = {
    "dmm_wrap.version": 0, "dmm_wrap.config": 0, "dmm_wrap.validation": 0,
    "dmm_wrap.core": 1,
    "dmm_wrap.data": 2, "dmm_wrap.io": 2, "dmm_wrap.backbones": 2, "dmm_wrap.probes": 2,
    "dmm_wrap.inference": 3, "dmm_wrap.train": 3,
    "dmm_wrap.model": 4,
    "dmm_wrap.apps": 5,
    "dmm_wrap": 6, "dmm_wrap.__main__": 6,
}
MAX_MODULE_LINES, MAX_CLASS_LINES, MAX_FUNCTION_LINES = 450, 250, 80
DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted name -> file for every .py under package_dir; a package's __init__.py bears the package's name."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def parse(path: Path) -> ast.Module:
    """The ast of one source file."""
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def is_private(name: str) -> bool:
    """A leading underscore that is not a dunder."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def internal_imports(module: str, path: Path,
                     modules: dict[str, Path]) -> Iterator[tuple[str, str | None, ast.stmt, ast.alias]]:
    """(imported module, imported name or None, node, alias) for every import of the package anywhere in the file.

    `from pkg import x` names the submodule pkg.x when there is one, else pkg (its __init__) with the name x."""
    root = module.split(".")[0]

    def internal(name: str) -> bool:
        return name == root or name.startswith(root + ".")

    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if internal(alias.name):
                    yield alias.name, None, node, alias
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                if node.level > len(package):
                    continue  # beyond the top package: an ImportError, not a layering question
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not internal(base):
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield (submodule, None, node, alias) if submodule in modules else (base, alias.name, node, alias)


def import_graph(package_dir: Path) -> dict[str, dict[str, list[int]]]:
    """module -> {imported package module -> line numbers of the imports}."""
    modules = module_files(package_dir)
    graph: dict[str, dict[str, list[int]]] = {}
    for module, path in modules.items():
        edges = graph.setdefault(module, {})
        for target, _, node, _ in internal_imports(module, path, modules):
            edges.setdefault(target, []).append(node.lineno)
    return graph


def rank_of(module: str, ranks: dict[str, int]) -> int | None:
    """The rank of the longest key that names the module or a package above it (the root package only exactly)."""
    keys = [k for k in ranks if module == k or ("." in k and module.startswith(k + "."))]
    return ranks[max(keys, key=len)] if keys else None


def layer_violations(package_dir: Path, ranks: dict[str, int]) -> list[str]:
    """Every module in no rank, and every import edge `a -> b (rank i -> j)` that goes up."""
    modules = module_files(package_dir)
    problems = [f"{m} is in no rank: place it in RANKS here and in README 'Architecture'"
                for m in modules if rank_of(m, ranks) is None]
    for module, edges in import_graph(package_dir).items():
        for target, lines in sorted(edges.items()):
            i, j = rank_of(module, ranks), rank_of(target, ranks)
            where = f"line {', '.join(map(str, sorted(set(lines))))}"
            if j is None and target not in modules:
                problems.append(f"{module} -> {target} (not a module of any rank), {where}")
            elif i is not None and j is not None and j > i:
                problems.append(f"{module} -> {target} (rank {i} -> {j}), {where}")
    return problems


def definitions(node: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.AST]]:
    """(qualified name, node) for every function and class, nested ones included."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, DEFS):
            yield prefix + child.name, child
            yield from definitions(child, f"{prefix}{child.name}.")
        else:
            yield from definitions(child, prefix)


def size_offenders(package_dir: Path) -> list[str]:
    """Each module, class and function over its line limit, with its size."""
    problems = []
    for path in module_files(package_dir).values():
        rel = path.relative_to(package_dir.parent)
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES:
            problems.append(f"{rel}: module, {lines} lines (max {MAX_MODULE_LINES})")
        for name, node in definitions(parse(path)):
            size = node.end_lineno - node.lineno + 1
            kind, limit = ("class", MAX_CLASS_LINES) if isinstance(node, ast.ClassDef) else ("function",
                                                                                           MAX_FUNCTION_LINES)
            if size > limit:
                problems.append(f"{rel}:{node.lineno} {kind} {name}, {size} lines (max {limit})")
    return problems


def block_defs(body: list[ast.stmt]) -> Iterator[ast.AST]:
    """The functions and classes defined directly in a body, also under if / try / with at that level."""
    for stmt in body:
        if isinstance(stmt, DEFS):
            yield stmt
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                for inner in getattr(stmt, field, []):
                    yield from block_defs(inner.body if isinstance(inner, ast.ExceptHandler) else [inner])


def is_accessor(node: ast.AST) -> bool:
    """A property's setter or deleter, which shares the getter's docstring."""
    return any(isinstance(d, ast.Attribute) and d.attr in ("setter", "deleter") for d in node.decorator_list)


def docstring_offenders(package_dir: Path) -> list[str]:
    """Public module-level functions and classes, and public methods of public classes, without a docstring or with
    an empty first docstring line."""
    problems = []

    def check(node: ast.AST, name: str, rel: Path) -> None:
        doc = ast.get_docstring(node, clean=False)
        if doc is None:
            problems.append(f"{rel}:{node.lineno} {name}: no docstring")
        elif not doc.split("\n", 1)[0].strip():
            problems.append(f"{rel}:{node.lineno} {name}: the docstring's first line is empty")

    for path in module_files(package_dir).values():
        rel = path.relative_to(package_dir.parent)
        for node in block_defs(parse(path).body):
            if node.name.startswith("_"):
                continue
            check(node, node.name, rel)
            if isinstance(node, ast.ClassDef):
                for item in block_defs(node.body):
                    if (isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("_")
                            and not is_accessor(item)):
                        check(item, f"{node.name}.{item.name}", rel)
    return problems


def private_import_offenders(package_dir: Path) -> list[str]:
    """`from .x import _y` across package modules, and `x._y` on a package module bound by an import."""
    modules = module_files(package_dir)
    problems = []
    for module, path in modules.items():
        rel = path.relative_to(package_dir.parent)
        bound: dict[str, str] = {}  # local name -> package module it is bound to
        for target, name, node, alias in internal_imports(module, path, modules):
            if name is not None and is_private(name) and target != module:
                problems.append(f"{rel}:{node.lineno} imports {name} from {target}")
            elif name is None and (alias.asname or isinstance(node, ast.ImportFrom)):
                bound[alias.asname or alias.name] = target  # a plain `import a.b` binds `a`: left out
        for node in ast.walk(parse(path)):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and is_private(node.attr) and bound[node.value.id] != module):
                problems.append(f"{rel}:{node.lineno} uses {node.value.id}.{node.attr} of {bound[node.value.id]}")
    return problems


def write_package(tmp_path: Path, files: dict[str, str]) -> Path:
    """A fake dmm_wrap package under tmp_path holding the given files (path -> source)."""
    package_dir = tmp_path / "dmm_wrap"
    for name, text in files.items():
        (package_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (package_dir / name).write_text(text)
    return package_dir


def _report(title: str, problems: list[str]) -> str:
    return f"{title} ({len(problems)}):\n  " + "\n  ".join(problems)


def test_imports_only_go_down_the_layers() -> None:
    problems = layer_violations(PACKAGE_DIR, RANKS)
    assert not problems, _report("Imports up the layers, or modules in no rank", problems)


def test_layer_checker_catches_a_lazy_upward_import(tmp_path: Path) -> None:
    # Negative control: a fake package where a core module imports an apps module inside a function.
    files = {
        "__init__.py": "from .apps import cli\n",
        "config.py": "X = 1\n",
        "extra.py": "",
        "core/__init__.py": "",
        "core/hooks.py": "from ..config import X\n\n\ndef later():\n    from ..apps import cli\n    return cli, X\n",
        "apps/__init__.py": "",
        "apps/cli.py": "import dmm_wrap.config\nfrom ..core import hooks\nfrom ..core import helper\n",
    }
    package_dir = write_package(tmp_path, files)
    graph = import_graph(package_dir)
    assert graph["dmm_wrap.apps.cli"] == {"dmm_wrap.config": [1], "dmm_wrap.core.hooks": [2], "dmm_wrap.core": [3]}
    assert graph["dmm_wrap"] == {"dmm_wrap.apps.cli": [1]}
    assert layer_violations(package_dir, RANKS) == [
        "dmm_wrap.extra is in no rank: place it in RANKS here and in README 'Architecture'",
        "dmm_wrap.core.hooks -> dmm_wrap.apps.cli (rank 1 -> 5), line 5",
    ]


def test_private_name_checker_catches_imports_and_attributes(tmp_path: Path) -> None:
    # Negative control: a private name imported, and one read off an imported module; dunders and modules are fine.
    files = {
        "__init__.py": "from .version import __version__\n",
        "version.py": "__version__ = '0'\n",
        "config.py": "_x = 1\n_y = 2\n",
        "core/__init__.py": "",
        "core/_impl.py": "",
        "core/hooks.py": ("from ..config import _x\nfrom .. import config as c\nfrom . import _impl\n\n"
                          "Z = c._y, _impl\n"),
    }
    package_dir = write_package(tmp_path, files)
    assert private_import_offenders(package_dir) == [
        "dmm_wrap/core/hooks.py:1 imports _x from dmm_wrap.config",
        "dmm_wrap/core/hooks.py:5 uses c._y of dmm_wrap.config",
    ]


def test_modules_classes_and_functions_are_small() -> None:
    problems = size_offenders(PACKAGE_DIR)
    assert not problems, _report("Over the size limits", problems)


def test_public_names_have_a_docstring() -> None:
    problems = docstring_offenders(PACKAGE_DIR)
    assert not problems, _report("Public names without a one-line docstring summary", problems)


def test_private_names_stay_in_their_module() -> None:
    problems = private_import_offenders(PACKAGE_DIR)
    assert not problems, _report("Private names used across modules (make them public, with a docstring)", problems)


def test_readme_architecture_names_every_module() -> None:
    readme = (PACKAGE_DIR.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Architecture\n", 1)[1].split("\n## ", 1)[0]
    tree = section.split("```", 2)[1]
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", tree))
    missing = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        rel = path.relative_to(PACKAGE_DIR)
        names = [*rel.parts[:-1], path.stem] if path.stem != "__init__" else list(rel.parts[:-1])
        if path.stem in ("__init__", "__main__") and len(rel.parts) == 1:
            continue  # named as files in the last line of the tree
        missing += [f"{rel} ({name})" for name in names if name not in words]
    assert not missing, _report("Modules the README's Architecture tree does not name", missing)
