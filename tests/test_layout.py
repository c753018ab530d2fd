"""The repository's layout never gets in the way of the installed world.

* No top-level folder or module of the checkout is imported in place of an installed
  distribution of the same name when the repository root is on ``sys.path`` (pytest from the
  root, ``python -m`` / ``python -c`` from the root).  Hugging Face's ``kernels`` (which
  transformers >= 5.25 imports) against our ``kernels/`` folder is the case that broke.
* No top-level folder but ``r4b`` is a regular package (has ``__init__.py``): a folder without
  one is at most a namespace portion, which an installed regular package always wins against,
  so no distribution installed later can be shadowed either.
* The trainer's modules import each other in one direction (no cycles, lazy imports included).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OURS = {"r4b", "r4b-kernels"}

# Run from the repository root with the root first on sys.path, as `python -c` from there has it.
_PROBE = r"""
import importlib.metadata as md, importlib.util, json, pathlib, sys
repo = pathlib.Path(sys.argv[1]).resolve()
sys.path.insert(0, str(repo))
names = {p.stem if p.suffix == ".py" else p.name for p in repo.iterdir()
         if not p.name.startswith(".") and (p.is_dir() or p.suffix == ".py")}
owners = md.packages_distributions()
out = []
for name in sorted(names):
    dists = sorted(set(owners.get(name, ())))
    if not dists or {d.lower().replace("_", "-") for d in dists} <= {"r4b", "r4b-kernels"}:
        continue
    spec = importlib.util.find_spec(name)
    where = [spec.origin] if spec.origin else list(spec.submodule_search_locations or [])
    mine = (repo / name, repo / f"{name}.py")  # not a virtualenv that lives in the checkout
    inside = [w for w in where if w and any(pathlib.Path(w).resolve().is_relative_to(m)
                                            for m in mine)]
    out.append({"name": name, "dists": dists, "origin": where, "shadowed": bool(inside)})
print(json.dumps(out))
"""


def _top_level_entries() -> list[Path]:
    return [p for p in REPO.iterdir() if not p.name.startswith(".") and p.is_dir()
            and not (p / "pyvenv.cfg").exists()]


def test_no_top_level_folder_shadows_an_installed_distribution():
    r = subprocess.run([sys.executable, "-c", _PROBE, str(REPO)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    shadowed = [f for f in found if f["shadowed"]]
    assert not shadowed, f"checkout folders imported in place of installed distributions: {shadowed}"
    # transformers >= 5.25 requires Hugging Face's `kernels`: the probe must have looked at it.
    from importlib import metadata

    try:
        metadata.distribution("kernels")
    except metadata.PackageNotFoundError:
        return
    assert any(f["name"] == "kernels" for f in found), found


def test_only_r4b_is_a_regular_package_at_the_root():
    regular = sorted(p.name for p in _top_level_entries() if (p / "__init__.py").exists())
    assert regular == ["r4b"], (f"top-level folders with __init__.py shadow any installed "
                                f"distribution of that name: {regular}")


def test_kernels_and_transformers_import_from_the_root():
    code = ("import kernels, r4b_kernels, pathlib, sys; "
            "from transformers import LlavaOnevisionForConditionalGeneration; "
            "print(kernels.__file__); print(r4b_kernels.__file__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    hf_kernels, ours = r.stdout.split()
    assert not Path(hf_kernels).resolve().is_relative_to(REPO / "kernels"), hf_kernels
    assert Path(ours).parent.name == "r4b_kernels"


def test_r4b_kernels_imports_without_r4b():
    code = ("import sys, r4b_kernels; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('r4b', 'megatron', 'vllm', 'transformers')); print(bad)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


def _module_graph(pkg: Path) -> dict[str, set[str]]:
    """Module -> modules of the same package it imports (lazy, function-level imports too)."""
    mods = {}
    for p in pkg.rglob("*.py"):
        parts = p.relative_to(pkg.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        here = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[:len(here.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[m] |= {t for t in targets
                         if t in mods and t != m and not m.startswith(t + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_no_import_cycles():
    for pkg in (REPO / "r4b", REPO / "kernels" / "r4b_kernels"):
        assert _cycles(_module_graph(pkg)) == [], pkg


def test_kernels_wheel_is_only_r4b_kernels_with_torch_triton_numpy(tmp_path):
    """`pip install ./kernels` builds a wheel holding r4b_kernels alone, needing only torch
    (and triton, with the numpy triton imports, on Linux) -- no r4b, megatron-core or C++."""
    import zipfile
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path), str(REPO / "kernels")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("r4b_kernels-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = z.read(meta).decode()
    packages = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert packages == {"r4b_kernels"}, packages
    assert "r4b_kernels/policy_loss.py" in names and "r4b_kernels/grouped_advantage.py" in names
    assert {"r4b_kernels/integrations/__init__.py", "r4b_kernels/integrations/trl.py",
            "r4b_kernels/integrations/verl.py"} <= set(names), names
    requires = sorted(line.split(":", 1)[1].split(";")[0].strip().split(">")[0].split("<")[0]
                      .split("=")[0].strip()
                      for line in metadata.splitlines() if line.startswith("Requires-Dist:"))
    assert requires == ["numpy", "torch", "triton"], requires
    import r4b_kernels
    assert f"Version: {r4b_kernels.__version__}" in metadata
