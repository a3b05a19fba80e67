"""Prompt templates for Stage 3 (rewrite and verification), read from text files so users can swap them.

A template is a plain text file `<name>.txt` in a prompt directory (default: the packaged `generate/prompts/`). It
holds the literal placeholder `{text}` (the modification text to rewrite or verify) exactly once; everything else,
JSON braces included, is copied verbatim, so templates are filled by string replacement, not `str.format`.
"""

from __future__ import annotations

import os

PLACEHOLDER = "{text}"
PACKAGED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")

# The template of each rewrite prompt mode (cfg.calibrate.prompt_mode) and of the two verification prompts.
REWRITE_TEMPLATES = {"minimal_json": "rewrite_minimal_json", "staged_cot": "rewrite_staged_cot"}
VERIFY_TEMPLATE = "verify"
VERIFY_INTENT_TEMPLATE = "verify_intent"


def load_template(name: str, prompt_dir: str = "") -> str:
  """The text of `<prompt_dir or the packaged dir>/<name>.txt`, checked to hold `{text}` exactly once."""
  path = os.path.join(prompt_dir or PACKAGED_DIR, f"{name}.txt")
  if not os.path.exists(path):
    raise FileNotFoundError(f"prompt template {path} does not exist (config calibrate.prompt_dir="
                            f"{prompt_dir!r}; expected files: {sorted(REWRITE_TEMPLATES.values())} + "
                            f"{[VERIFY_TEMPLATE, VERIFY_INTENT_TEMPLATE]} with the .txt suffix)")
  with open(path, encoding="utf-8") as f:
    template = f.read().strip()
  if template.count(PLACEHOLDER) != 1:
    raise ValueError(f"prompt template {path} must contain the placeholder {PLACEHOLDER} exactly once, found "
                     f"{template.count(PLACEHOLDER)}")
  return template


def fill(template: str, text: str) -> str:
  return template.replace(PLACEHOLDER, text)
