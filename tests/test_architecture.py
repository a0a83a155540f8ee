"""The layering rule and no import cycles, read from the source with ``ast`` (docs/architecture.md).

core (``adaface``, ``net``, ``face_alignment``) < storage (``gallery``) < service (``serving``) and
command line (``cli``) < entry points (``flask_http_server``, ``AdaFaceFeature``, ``config``,
``gunicorn.conf``). A module imports only from its own layer or below (the service and the
command line not from each other), only entry points read the environment, and the core and
storage import no web framework.
"""
import ast
from pathlib import Path

import pytest

from conftest import REPO

LAYERS = {"adaface": 0, "net": 0, "face_alignment": 0, "gallery": 1, "serving": 2, "cli": 2,
          "flask_http_server": 3, "AdaFaceFeature": 3, "config": 3, "gunicorn": 3}
#: third-party packages a layer may not use
FORBIDDEN = {0: {"flask", "werkzeug", "gunicorn", "psycopg", "sqlite3", "pydantic", "apispec"},
             1: {"flask", "werkzeug", "gunicorn", "pydantic", "apispec"}}
SKIPPED = {"tests", "bench", "tools", "docs", "pretrained", "data", ".venv"}


def project_modules(root: Path) -> dict:
    """module name -> file, for every .py file of the project outside tests, bench and tools."""
    found = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] in SKIPPED or any(p.startswith(".") for p in rel.parts):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _ancestors(name: str) -> list:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports_of(name: str, path: Path, modules: dict, with_kind: bool = False) -> list:
    """(imported name, line) of every import in the file, function-level ones included; relative
    imports resolved; ``from pkg import mod`` gives ``pkg.mod`` when that is a module. With
    ``with_kind``, a third item says whether the name itself is asked for (``pkg`` is not in
    ``from pkg import mod``, where only its submodule is)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, True) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if package else []
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
            found.append((base, node.lineno, len(submodules) < len(node.names)))
            found += [(sub, node.lineno, True) for sub in submodules]
    return found if with_kind else [(n, line) for n, line, _ in found]


def edges(modules: dict) -> dict:
    """module -> {project module it imports}: the module itself and the packages above it that
    are not the importer's own (importing ``a.b`` runs ``a/__init__.py`` first)."""
    graph = {}
    for name, path in modules.items():
        targets = set()
        own = set(_ancestors(name))
        for imported, _, explicit in imports_of(name, path, modules, with_kind=True):
            if explicit and imported in modules and imported != name:
                targets.add(imported)
            for candidate in _ancestors(imported):
                if candidate in modules and candidate != name and candidate not in own:
                    targets.add(candidate)
        graph[name] = targets
    return graph


def cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer(name: str):
    return LAYERS.get(name.split(".")[0])


def violations(modules: dict) -> list:
    """Every import against the layering rule, as 'importer:line -> imported (why)'."""
    bad = []
    for name, path in modules.items():
        mine = layer(name)
        if mine is None or mine == 3:
            continue
        for imported, line in imports_of(name, path, modules):
            top = imported.split(".")[0]
            # a project module, not a package of the same first name (``gunicorn`` is
            # third-party; the project's ``gunicorn.conf`` is the entry point)
            ours = imported in modules or any(a in modules for a in _ancestors(imported))
            theirs = layer(imported) if ours else None
            where = f"{name}:{line} -> {imported}"
            if theirs is not None and theirs > mine:
                bad.append(f"{where} (imports a higher layer)")
            elif theirs == mine == 2 and top != name.split(".")[0]:
                bad.append(f"{where} (the service and the command line stay apart)")
            elif top in FORBIDDEN.get(mine, ()):
                bad.append(f"{where} ({top} is not for this layer)")
    return bad


def environment_reads(modules: dict) -> list:
    """``os.environ`` / ``os.getenv`` outside the entry points."""
    bad = []
    for name, path in modules.items():
        if layer(name) in (None, 3):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv") \
                    and isinstance(node.value, ast.Name) and node.value.id == "os":
                bad.append(f"{name}:{node.lineno} reads os.{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module == "os" \
                    and any(a.name in ("environ", "getenv") for a in node.names):
                bad.append(f"{name}:{node.lineno} imports os.environ")
    return bad


@pytest.fixture(scope="module")
def modules():
    found = project_modules(REPO)
    assert {"adaface.pipeline", "gallery.store", "serving.routes.embed", "cli.gallery", "AdaFaceFeature",
            "flask_http_server", "net", "face_alignment.detector"} <= set(found)
    return found


def test_no_import_cycles(modules):
    assert cycles(edges(modules)) == []


def test_no_import_against_the_layers(modules):
    assert violations(modules) == []


def test_only_entry_points_read_the_environment(modules):
    assert environment_reads(modules) == []


def test_every_project_module_has_a_layer(modules):
    assert [m for m in modules if layer(m) is None] == []


def _tree(tmp_path, files: dict) -> dict:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return project_modules(tmp_path)


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The checker itself: an upward import, a cycle through relative imports, a package-level
    cycle, a framework in the core, an environment read, and the service importing the CLI."""
    found = _tree(tmp_path, {
        "adaface/__init__.py": "",
        "adaface/a.py": "from . import b\nimport os\nx = os.environ.get('X')\n",
        "adaface/b.py": "from .a import thing\nimport flask\n",
        "adaface/c.py": "def late():\n    from serving import thing\n",
        "gallery/__init__.py": "from .store import S\n",
        "gallery/store.py": "from gallery.open import o\n",
        "gallery/open.py": "import gallery\n",
        "serving/__init__.py": "",
        "serving/x.py": "from cli.y import z\n",
        "cli/__init__.py": "",
        "cli/y.py": "from serving import x\n",
    })
    assert sorted(cycles(edges(found))) == [["adaface.a", "adaface.b"], ["cli.y", "serving.x"],
                                            ["gallery", "gallery.open", "gallery.store"]]
    bad = "\n".join(violations(found))
    assert "adaface.c:2 -> serving (imports a higher layer)" in bad
    assert "adaface.b:2 -> flask (flask is not for this layer)" in bad
    assert "serving.x:1 -> cli.y (the service and the command line stay apart)" in bad
    assert environment_reads(found) == ["adaface.a:3 reads os.environ"]
