"""Importing recall_jax keeps transformers' "PyTorch was not found" advice out of a run without torch."""
import os
import subprocess
import sys
import textwrap

# A child interpreter where torch looks uninstalled, as on a machine with only requirements.txt.
_CHILD = textwrap.dedent("""
    import importlib.util, sys
    _find = importlib.util.find_spec
    importlib.util.find_spec = lambda n, *a, **k: None if n.split(".")[0] == "torch" else _find(n, *a, **k)
    if sys.argv[1] == "recall_jax":
      import recall_jax
    import transformers
""")


def _stderr(first_import: str) -> str:
  run = subprocess.run([sys.executable, "-c", _CHILD, first_import], capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items()
                            if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"})
  assert run.returncode == 0, run.stderr
  return run.stderr


def test_transformers_torch_advice_is_silenced_by_importing_recall_jax():
  assert "PyTorch was not found" in _stderr("transformers")  # the child does hide torch
  assert "PyTorch was not found" not in _stderr("recall_jax")
