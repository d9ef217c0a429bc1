"""The package's import graph (docs/architecture.md): every arrow points nodes/ -> calibration/ -> qsched/, no
import cycle between files or between folders (no exemption), the front ends (calibration/app) sit above the toy
world (calibration/shapeworld), which sits above the calibration library, and ComfyUI is imported only by the
adapters (nodes/). Every import counts, including the ones inside functions."""

import ast
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("qsched", "calibration", "nodes")
#: The top-level packages each one may import (the layering of docs/architecture.md).
ALLOWED = {"qsched": set(), "calibration": {"qsched"}, "nodes": {"calibration", "qsched"}}
#: Layers inside calibration/, top first: a module may import its own layer and the ones below, never one above.
FRONT_ENDS = "calibration.app"
TOY_WORLD = "calibration.shapeworld"


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """module name -> the pack's modules it imports (relative imports resolved; ``from . import x`` -> ``pkg.x``)."""
    files = {}
    for top in packages:
        for path in sorted((root / top).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            files[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = package.split(".")
                base = parts[: len(parts) - (node.level - 1)]
                if node.level - 1 > len(parts) - 1:
                    base = []  # above the top-level packages: the pack's root
                module = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{module}.{alias.name}" if module else alias.name
                    targets.add(sub if sub in files else module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                bad = [m for m in mods if m == "qsched_pack" or m.startswith("qsched_pack.")]
                assert not bad, f"{path}: imports {bad} absolutely; imports inside the pack are relative"
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def package_graph(graph: dict[str, set[str]], root: Path = ROOT) -> dict[str, set[str]]:
    """Folder-level graph (a module's package is its folder)."""
    def folder(m):
        return m if (root / m.replace(".", os.sep)).is_dir() else m.rpartition(".")[0]

    out: dict[str, set[str]] = {}
    for m, targets in graph.items():
        for t in targets:
            if folder(t) != folder(m):
                out.setdefault(folder(m), set()).add(folder(t))
    return out


def external_imports(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """module name -> the top-level names it imports absolutely (``comfy``, ``diffusers``, ``torch``, ...), at any
    depth (inside functions too)."""
    out = {}
    for top in packages:
        for path in sorted((root / top).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            mods = set()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
                if isinstance(node, ast.Import):
                    mods |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    mods.add(node.module.split(".")[0])
            out[name] = mods
    return out


GRAPH = import_graph(ROOT)
EXTERNAL = external_imports(ROOT)
#: ComfyUI's importable top-level modules: only the adapters (nodes/) may import them.
COMFY_MODULES = {"comfy", "comfy_extras", "comfy_api", "comfy_execution", "folder_paths", "server",
                 "latent_preview", "node_helpers", "execution"}


def test_the_graph_sees_every_module_and_function_level_imports():
    assert {"qsched.samplers", "calibration.runner", "calibration.shapeworld.world", "calibration.app.cli",
            "nodes.comfy_generator"} <= set(GRAPH)
    assert "calibration.search" in GRAPH["calibration.runner"]  # module level
    assert "calibration.shapeworld.world" in GRAPH["calibration.shapeworld.train"]  # inside train_all
    assert "calibration.app.demo" in GRAPH["calibration.app.cli"]  # inside _demo
    assert "calibration.generate" in GRAPH["nodes.comfy_generator"]


def test_no_import_cycle_between_files():
    assert cycles(GRAPH) == []


def test_arrows_point_nodes_to_calibration_to_qsched():
    wrong = sorted((m, t) for m, targets in GRAPH.items() for t in targets
                   if t.split(".")[0] != m.split(".")[0] and t.split(".")[0] not in ALLOWED[m.split(".")[0]])
    assert wrong == []


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(module, target) pairs where calibration's library reaches the toy world or the front ends, or the toy
    world reaches the front ends, or anything outside the front ends imports them."""
    def layer(m):
        return 2 if m.startswith(FRONT_ENDS) else 1 if m.startswith(TOY_WORLD) else 0

    return sorted((m, t) for m, targets in graph.items() for t in targets
                  if t.startswith("calibration.") and layer(t) > layer(m))


def test_no_import_cycle_between_packages():
    assert cycles(package_graph(GRAPH)) == []


def test_front_ends_above_the_toy_world_above_the_library():
    assert upward_imports(GRAPH) == []


def offenders(external: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(module, import) pairs that break the adapter rule: ComfyUI only in nodes/, diffusers in qsched/ only in its
    drop-in scheduler wrapper (qsched.diffusers, which imports it lazily)."""
    bad = [(m, x) for m, mods in external.items() if not m.startswith("nodes") for x in sorted(mods & COMFY_MODULES)]
    bad += [(m, "diffusers") for m, mods in external.items()
            if m.startswith("qsched") and m != "qsched.diffusers" and "diffusers" in mods]
    return sorted(bad)


def test_only_the_adapters_import_comfyui():
    assert "torch" in EXTERNAL["qsched.samplers"] and "comfy" in EXTERNAL["nodes.quant_ops"]  # the scan sees imports
    assert offenders(EXTERNAL) == []


def test_search_is_a_leaf_and_test_doubles_stay_out_of_the_product():
    assert GRAPH["calibration.search"] <= {"qsched.coefficients"}
    users = sorted(m for m, targets in GRAPH.items() if "calibration.testing" in targets)
    assert users == []


def test_the_checks_fail_on_a_planted_cycle_and_a_backward_arrow(tmp_path):
    for rel, text in {"qsched/__init__.py": "", "qsched/a.py": "from .b import x\n",
                      "qsched/b.py": "def f():\n    from . import a\n", "calibration/__init__.py": "",
                      "calibration/c.py": "", "nodes/__init__.py": ""}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "qsched" / "b.py").write_text("from ..calibration import c\ndef f():\n    from . import a\n")
    g = import_graph(tmp_path)
    assert cycles(g) == [["qsched.a", "qsched.b"]]
    assert g["qsched.b"] == {"qsched.a", "calibration.c"}  # the backward arrow qsched -> calibration is seen
    # a folder cycle without a file cycle: calibration.c -> calibration.sub.d, calibration.sub.e -> calibration.f
    for rel, text in {"calibration/sub/__init__.py": "", "calibration/sub/d.py": "", "calibration/f.py": "",
                      "calibration/sub/e.py": "from .. import f\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "calibration" / "c.py").write_text("from .sub import d\n")
    g = import_graph(tmp_path)
    assert cycles(g) == [["qsched.a", "qsched.b"]]  # no new file cycle...
    assert cycles(package_graph(g, tmp_path)) == [["calibration", "calibration.sub"]]  # ...but a folder cycle
    assert upward_imports({"calibration.runner": {"calibration.app.cli"}, "nodes.x": {"calibration.app.demo"},
                           "calibration.app.cli": {"calibration.shapeworld.world", "calibration.runner"}}) == [
        ("calibration.runner", "calibration.app.cli"), ("nodes.x", "calibration.app.demo")]
    (tmp_path / "qsched" / "a.py").write_text("def f():\n    import comfy.ops\n    from diffusers import X\n")
    (tmp_path / "calibration" / "c.py").write_text("import folder_paths\n")
    assert offenders(external_imports(tmp_path)) == [("calibration.c", "folder_paths"), ("qsched.a", "comfy"),
                                                     ("qsched.a", "diffusers")]


def _resolves(dotted: str) -> bool:
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module("qsched_pack." + ".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_python_names_in_readme_and_docs_exist():
    import re

    docs = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
    assert len(docs) > 5
    for doc in docs:
        text = re.sub(r"## Moved where.*?(?=\n## )", "", doc.read_text(encoding="utf-8"), flags=re.S)  # old names
        code = "\n".join(re.findall(r"```python\n(.*?)```", text, flags=re.S))
        for line in code.splitlines():
            if line.startswith("from qsched_pack") or line.startswith("import qsched_pack"):
                exec(line, {})  # noqa: S102  (our own README's import lines)
        names = set(re.findall(r"`((?:qsched|calibration|nodes)\.[A-Za-z_][\w.]*[\w])(?:\(|`)", text))
        missing = sorted(n for n in names if not _resolves(n))
        assert missing == [], f"{doc.name}: {missing}"
