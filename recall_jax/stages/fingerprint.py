"""What a stage's artifacts were made from, so that a rerun with a changed config never mixes with them.

A stage's fingerprint hashes the config fields that can change its artifacts: its own config sections and those of
every stage before it in the pipeline's order (prepare, teach, adapt, then each round's mine, calibrate, refine, then
evaluate, report). An upstream change therefore changes every later fingerprint. Each manifest also records the
run ids of the upstream manifests it read, so an upstream stage that was rerun (same config, new artifacts) makes
its dependants stale too. Fields that cannot change results (logging cadence, contact sheets, input threads, the
mesh: sharded == unsharded, the data format: files == ArrayRecord) are left out, so changing them reruns nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

from ml_collections import ConfigDict

from recall_jax import files
from recall_jax.stages import paths

# Config sections per stage (dotted prefixes). A stage depends on its own and on all earlier stages' sections.
# Dotted names pick one field of another stage's section: the fields a stage reads before that stage runs.
_TEMPLATES = ("calibrate.prompt_dir", "calibrate.prompt_mode", "calibrate.verify_turns")
SECTIONS = {
    # The world tokenizer's corpus holds the rewrite / verification prompts and answers (stages/tokenizer_corpus.py).
    "prepare": ("world", "model", "data") + _TEMPLATES + ("teach.reasoning",),
    # Teach trains on Stage 3's prompts. (Its quality figures are measured with calibrate's decoding settings, which
    # its manifest records; changing those alone does not teach F again.)
    "teach": ("teach",) + _TEMPLATES,
    "adapt": ("seed", "train", "lora", "loss", "optim", "eval", "sharding"),
    "mine": ("mine",),
    "calibrate": ("calibrate",),
    "refine": ("refine",),
    "evaluate": ("rounds",),
    "report": (),
}
ORDER = tuple(SECTIONS)
# data.format / data.array_record_dir say in which form and where the same dataset is read: the ArrayRecord records
# hold the image files' bytes unchanged (data/tfds_builders.py), so every stage decodes the same arrays and gives
# the same results (tests/stages/test_data_format.py); switching formats reruns nothing.
_NEUTRAL = re.compile(r"(^|\.)(log_every|probe_every|sheet_\w+|data_threads|data_workers|keep_checkpoints|"
                      r"checkpoint_every|tensorboard|cache_dir)$|^data\.(format|array_record_dir)$")


def _flat(value: Any, prefix: str, out: dict) -> None:
  if isinstance(value, (ConfigDict, dict)):
    for k in sorted(value.keys()):
      _flat(value[k], f"{prefix}.{k}" if prefix else k, out)
  else:
    out[prefix] = list(value) if isinstance(value, tuple) else value


def config_fields(cfg: ConfigDict, workdir: str, stage: str) -> dict[str, Any]:
  """{dotted key: value} of the config fields stage `stage` (e.g. "round2/mine") depends on."""
  from recall_jax.stages import artifacts
  base, round_num = artifacts.parse_stage(stage)
  if base not in SECTIONS:
    raise ValueError(f"unknown stage {stage!r}; stages are {ORDER}")
  upto = ORDER[:ORDER.index(base) + 1]
  if round_num >= 2:  # round r also follows round 1's calibrate and refine
    upto = ORDER[:ORDER.index("refine") + 1]
  flat: dict[str, Any] = {}
  cfg_dict = cfg.to_dict()
  for s in upto:
    for section in SECTIONS[s]:
      value, found = cfg_dict, True
      for part in section.split("."):
        found = isinstance(value, dict) and part in value
        if not found:
          break
        value = value[part]
      if found:
        _flat(value, section, flat)
  flat = {k: v for k, v in flat.items() if not _NEUTRAL.search(k)}
  if "model.checkpoint" in flat:  # "" = prepare's tiny base: the same base, whatever folder names it
    flat["model.checkpoint"] = files.real(paths.checkpoint_dir(cfg, workdir))
  if "calibrate.prompt_dir" in flat:  # the templates' text, not only their folder: an edited file is a change
    flat["calibrate.templates_sha256"] = _templates_digest(flat["calibrate.prompt_dir"])
  if round_num >= 2:
    flat["round"] = round_num
  return json.loads(json.dumps(flat, default=str))


def _templates_digest(prompt_dir: str) -> str:
  from recall_jax.generate import prompt_files
  folder = prompt_files.resolve_dir(prompt_dir)
  h = hashlib.sha256()
  for name in files.listdir(folder) if files.is_dir(folder) else []:
    if name.endswith(".txt"):
      h.update(name.encode() + b"\0")
      h.update(files.read_bytes(os.path.join(folder, name)) + b"\0")
  return h.hexdigest()[:16]


def digest(fields: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def changed_fields(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """'key: old -> new' for every field that differs (added and removed ones included)."""
  keys = sorted(set(recorded) | set(current))
  missing = object()
  return [f"{k}: {recorded.get(k, '(absent)')!r} -> {current.get(k, '(absent)')!r}" for k in keys
          if recorded.get(k, missing) != current.get(k, missing)]


def upstream_stages(stage: str, rounds: int) -> list[str]:
  """Every stage before `stage` in the pipeline's order (rounds expanded)."""
  from recall_jax.stages import artifacts
  order = artifacts.expand_stages(list(ORDER), max(rounds, artifacts.parse_stage(stage)[1], 1))
  return order[:order.index(stage)] if stage in order else []
