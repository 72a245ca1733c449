"""The packages import one way, zoo <- compress <- export <- train <- zoo_cli, and none imports another package's
private (`_name`) modules. Read from the source (every import statement, lazy ones inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("zoo", "compress", "export", "train", "zoo_cli")  # each may import only those before it


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, []


def _violations():
    files = [ROOT / "zoo_cli.py", *(p for pkg in LAYERS[:-1] for p in sorted((ROOT / pkg).rglob("*.py")))]
    for path in files:
        layer = path.relative_to(ROOT).parts[0].removesuffix(".py")
        rank = LAYERS.index(layer)
        for line, module, names in _imports(path):
            top = module.split(".")[0]
            if top not in LAYERS or top == layer:
                continue
            where = f"{path.relative_to(ROOT)}:{line} imports {module}"
            if LAYERS.index(top) > rank:
                yield f"{where} (a layer above {layer})"
            private = [p for p in module.split(".")[1:] if p.startswith("_")]
            private += [n for n in names if n.startswith("_") and (module + "." + n).count(".") >= 1
                        and (ROOT / Path(*module.split("."), n + ".py")).exists()]
            if private:
                yield f"{where} (private module of {top}: {', '.join(private)})"


def test_packages_import_one_way_and_no_private_module_across_packages():
    found = list(_violations())
    assert not found, "\n".join(found)


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The check above can fail: a planted upward import is reported."""
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "bad.py").write_text("def f():\n    from train.loop import fit\n")
    (tmp_path / "zoo_cli.py").write_text("")
    for pkg in LAYERS[1:-1]:
        (tmp_path / pkg).mkdir()
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert [v for v in _violations() if "zoo/bad.py:2 imports train.loop" in v]


def test_the_library_and_the_test_modules_import_no_torch():
    """torch is the tests' reference only: the four packages, the command and the test modules (what collection
    imports) load without it; the `parity` and `reference` tests import it when they run (`reference.torch`)."""
    import subprocess
    import sys

    modules = ["zoo", "compress", "export", "train", "zoo_cli"]
    modules += [p.stem for p in sorted((ROOT / "tests").glob("test_*.py"))]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "loaded = sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules)\n"
            + "assert not loaded, loaded\n")
    env = {**__import__("os").environ, "PYTHONPATH": f"{ROOT}{__import__('os').pathsep}{ROOT / 'tests'}"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
