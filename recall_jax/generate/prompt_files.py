"""Prompt templates for Stage 3 (rewrite and verification), read from text files so users can swap them.

A template is a plain text file `<name>.txt` in a prompt directory: the packaged `generate/prompts/` (config
calibrate.prompt_dir = ""), a packaged set by name (PACKAGED_SETS: "compact", short task statements for a tiny model
that reads no instructions, so its sequences hold the pictures and the text rather than ~350 tokens of rules), or
any folder path. It
holds the literal placeholder `{text}` (the modification text to rewrite or verify) exactly once; everything else,
JSON braces included, is copied verbatim, so templates are filled by string replacement, not `str.format`.
"""

from __future__ import annotations

import dataclasses
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
VERIFY_TURN_TEMPLATES = ("verify_ask", "verify_check")  # a two-turn verification (calibrate.verify_turns = 2)


def resolve_dir(prompt_dir: str = "") -> str:
  """The folder config calibrate.prompt_dir names: "" = the packaged templates, a PACKAGED_SETS name, or a path."""
  if not prompt_dir:
    return PACKAGED_DIR
  return PACKAGED_SETS.get(prompt_dir, prompt_dir)


def load_template(name: str, prompt_dir: str = "", *, text_optional: bool = False) -> str:
  """The text of `<resolve_dir(prompt_dir)>/<name>.txt`, checked to hold `{text}` exactly once (at most once with
  text_optional: a follow-up turn, whose conversation already holds the text)."""
  path = os.path.join(resolve_dir(prompt_dir), f"{name}.txt")
  if not files.exists(path):
    raise FileNotFoundError(f"prompt template {path} does not exist (config calibrate.prompt_dir="
                            f"{prompt_dir!r}; expected files: {sorted(REWRITE_TEMPLATES.values())} + "
                            f"{[VERIFY_TEMPLATE, VERIFY_INTENT_TEMPLATE, *VERIFY_TURN_TEMPLATES]} with the .txt "
                            "suffix)")
  template = files.read_text(path).strip()
  if template.count(PLACEHOLDER) not in ((0, 1) if text_optional else (1,)):
    raise ValueError(f"prompt template {path} must contain the placeholder {PLACEHOLDER} "
                     f"{'at most' if text_optional else 'exactly'} once, found {template.count(PLACEHOLDER)}")
  return template


def fill(template: str, text: str) -> str:
  return template.replace(PLACEHOLDER, text)


def two_picture_prompt(template: str, text: str) -> str:
  """Stage 3's prompt layout (rewrite and verification, at calibration and in teach's SFT data alike): the chat
  prompt "Picture 1: <reference> Picture 2: <instance>", the filled template, then the assistant header."""
  return prompts.multi_image_prompt(fill(template, text), num_images=2, system=prompts.DEFAULT_SYSTEM_PROMPT)


@dataclasses.dataclass(frozen=True)
class VerifyTurns:
  """A two-turn verification's prompts (calibrate.verify_turns = 2; sft.verify_turn_answers). The first turn shows
  Picture 1 (the reference) and the text, and F answers with its reading; the second continues that conversation
  with Picture 2 (the candidate) and the check template (which may name the text again), and F answers with its
  checks and the decision."""

  ask: str
  check: str

  @classmethod
  def load(cls, prompt_dir: str = "") -> "VerifyTurns":
    ask, check = VERIFY_TURN_TEMPLATES
    return cls(load_template(ask, prompt_dir), load_template(check, prompt_dir, text_optional=True))

  def first(self, text: str) -> str:
    return prompts.multi_image_prompt(fill(self.ask, text), num_images=1, system=prompts.DEFAULT_SYSTEM_PROMPT)

  def second(self, text: str, first_answer: str) -> str:
    """The first turn, F's (or the oracle's) answer to it, then the Picture 2 turn."""
    return prompts.follow_up_prompt(self.first(text), first_answer, fill(self.check, text), picture=2)
