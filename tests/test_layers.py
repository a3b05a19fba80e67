"""Imports flow one way: a package (or top-level module) of recall_jax imports only from layers below its own.

Annotation-only imports under `if TYPE_CHECKING:` do not count (they never run)."""

import ast
import pathlib

import recall_jax

# Lowest first. A unit may import units of lower layers only (and itself).
LAYERS = [
    {"progress", "faults", "parallel", "losses", "hardware"},
    {"files"},
    {"viz"},
    {"data"},
    {"models"},
    {"generate", "recall_config", "flops"},
    {"train", "eval"},
    {"embed", "abstract_programs"},
    {"stages"},
    {"config_check"},
    {"main"},
    {"cli", "study", "aot", "launch_local"},
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
ROOT = pathlib.Path(recall_jax.__file__).parent


def _unit(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "recall_jax"


def _imports(tree: ast.AST):
  """Modules imported at run time (skipping `if TYPE_CHECKING:` bodies)."""
  for node in ast.iter_child_nodes(tree):
    if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
      yield from (m for n in node.orelse for m in _imports(ast.Module(body=[n])))
      continue
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("recall_jax"):
      if node.module == "recall_jax":
        yield from (f"recall_jax.{a.name}" for a in node.names)
      else:
        yield node.module
    elif isinstance(node, ast.Import):
      yield from (a.name for a in node.names if a.name.startswith("recall_jax"))
    yield from _imports(node)


def _edges():
  for path in sorted(ROOT.rglob("*.py")):
    rel = path.relative_to(ROOT.parent).with_suffix("")
    unit = _unit(".".join(rel.parts)) if rel.name != "__init__" or len(rel.parts) > 2 else "recall_jax"
    for target in _imports(ast.parse(path.read_text())):
      if (dest := _unit(target)) not in (unit, "recall_jax"):
        yield unit, dest, path.relative_to(ROOT.parent)


def test_every_unit_has_a_layer():
  units = {p.stem if p.suffix else p.name for p in ROOT.iterdir()
           if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
  assert units == set(RANK), f"units without a layer: {units - set(RANK)}; layers of no unit: {set(RANK) - units}"


def test_imports_flow_down_the_layers():
  upward = sorted({f"{path}: {src} (layer {RANK[src]}) imports {dest} (layer {RANK[dest]})"
                   for src, dest, path in _edges() if RANK[dest] >= RANK[src]})
  assert not upward, "\n".join(upward)
