"""The package layout the design asks for: no import cycles, a report that imports no model loader,
no file over ~600 lines, no function over ~120 lines, and the CLI validates before heavy imports."""

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1] / "trajlab"


def _modules():
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        yield name, f


def _imports(name, f):
    """trajlab modules imported anywhere in the file (module level and inside functions)."""
    out = set()
    pkg = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("trajlab")}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([mod] if mod else []))
            if mod.startswith("trajlab"):
                out.add(mod)
                out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def _graph():
    mods = dict(_modules())
    return {n: {m for m in _imports(n, f) if m in mods and m != n and not n.startswith(m + ".")}
            for n, f in mods.items()}


def test_no_import_cycles():
    g = _graph()
    state, cycles = {}, []

    def visit(n, stack):
        state[n] = 1
        for m in g[n]:
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in g:
        if n not in state:
            visit(n, [n])
    # package __init__ re-exports are not cycles of concepts: ignore edges into a package's own __init__
    real = [c for c in cycles if not any(b == a.rsplit(".", 1)[0] for a, b in zip(c, c[1:]))]
    assert not real, real


def test_report_imports_no_model_loader_or_torch():
    for name, f in _modules():
        if not name.startswith(("trajlab.report", "trajlab.plots")):
            continue
        imported = _imports(name, f)
        bad = {m for m in imported if m.startswith(("trajlab.models", "trajlab.analysis.results", "trajlab.metrics"))}
        assert not bad, (name, bad)
        assert "import torch" not in f.read_text(), name


def test_files_and_functions_stay_small():
    big_files, big_funcs = [], []
    for name, f in _modules():
        lines = f.read_text().splitlines()
        if len(lines) > 620:
            big_files.append((name, len(lines)))
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 125:
                    big_funcs.append((name, node.name, n))
    assert not big_files and not big_funcs, (big_files, big_funcs)
