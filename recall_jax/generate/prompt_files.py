"""Prompt templates for Stage 3 (rewrite and verification), read from text files so users can swap them.

A template is a plain text file `<name>.txt` in a prompt directory: the packaged `generate/prompts/` (config
calibrate.prompt_dir = ""), a packaged set by name (PACKAGED_SETS: "compact", short task statements for a tiny model
that reads no instructions, so its sequences hold the pictures and the text rather than ~350 tokens of rules), or
any folder path. It
holds the literal placeholder `{text}` (the modification text to rewrite or verify) exactly once; everything else,
JSON braces included, is copied verbatim, so templates are filled by string replacement, not `str.format`.
"""

from __future__ import annotations

import os

from recall_jax import files
from recall_jax.data import prompts

PLACEHOLDER = "{text}"
PACKAGED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
PACKAGED_SETS = {"compact": os.path.join(PACKAGED_DIR, "compact")}

# The template of each rewrite prompt mode (cfg.calibrate.prompt_mode) and of the two verification prompts.
REWRITE_TEMPLATES = {"minimal_json": "rewrite_minimal_json", "staged_cot": "rewrite_staged_cot"}
VERIFY_TEMPLATE = "verify"
VERIFY_INTENT_TEMPLATE = "verify_intent"


def resolve_dir(prompt_dir: str = "") -> str:
  """The folder config calibrate.prompt_dir names: "" = the packaged templates, a PACKAGED_SETS name, or a path."""
  if not prompt_dir:
    return PACKAGED_DIR
  return PACKAGED_SETS.get(prompt_dir, prompt_dir)


def load_template(name: str, prompt_dir: str = "") -> str:
  """The text of `<resolve_dir(prompt_dir)>/<name>.txt`, checked to hold `{text}` exactly once."""
  path = os.path.join(resolve_dir(prompt_dir), f"{name}.txt")
  if not files.exists(path):
    raise FileNotFoundError(f"prompt template {path} does not exist (config calibrate.prompt_dir="
                            f"{prompt_dir!r}; expected files: {sorted(REWRITE_TEMPLATES.values())} + "
                            f"{[VERIFY_TEMPLATE, VERIFY_INTENT_TEMPLATE]} with the .txt suffix)")
  template = files.read_text(path).strip()
  if template.count(PLACEHOLDER) != 1:
    raise ValueError(f"prompt template {path} must contain the placeholder {PLACEHOLDER} exactly once, found "
                     f"{template.count(PLACEHOLDER)}")
  return template


def fill(template: str, text: str) -> str:
  return template.replace(PLACEHOLDER, text)


def two_picture_prompt(template: str, text: str) -> str:
  """Stage 3's prompt layout (rewrite and verification, at calibration and in teach's SFT data alike): the chat
  prompt "Picture 1: <reference> Picture 2: <instance>", the filled template, then the assistant header."""
  return prompts.multi_image_prompt(fill(template, text), num_images=2, system=prompts.DEFAULT_SYSTEM_PROMPT)
