"""Atomic artifact writing and stage manifests, so a crashed run resumes at the first unfinished stage."""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from typing import Any, Callable, Iterable

from recall_jax import files, parallel
from recall_jax.files import atomic_write_text
from recall_jax.train import logging as tb_logging

MANIFEST = "manifest.json"


def atomic_write_json(path: str, obj: Any) -> str:
  return files.atomic_write_json(path, obj, indent=2, sort_keys=True, default=str)


def write_jsonl(path: str, records: Iterable[dict]) -> str:
  return atomic_write_text(path, "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records))


def read_jsonl(path: str) -> list[dict]:
  out = []
  for i, line in enumerate(files.read_text(path).splitlines()):
    if line.strip():
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {i + 1} is not valid JSON ({e})") from e
  return out


# ReCALL's loop: (mine -> calibrate -> refine) repeated config `rounds` times. Round 1 keeps the plain folders
# <workdir>/mine, ... (as before rounds existed); round r >= 2 lives in <workdir>/round<r>/mine, .... A stage name
# is its folder relative to the workdir, so resume by manifest works per round with no extra bookkeeping.
ROUND_STAGES = ("mine", "calibrate", "refine")
_ROUND_NAME = re.compile(r"^round(\d+)/(\w+)$")


def round_stage(stage: str, round_num: int) -> str:
  """The stage name (= folder) of `stage` in round `round_num`: "mine" (round 1), "round2/mine", ...."""
  if stage not in ROUND_STAGES:
    raise ValueError(f"{stage!r} is not a round stage; round stages are {ROUND_STAGES}")
  if round_num < 1:
    raise ValueError(f"rounds count from 1, got {round_num}")
  return stage if round_num == 1 else f"round{round_num}/{stage}"


def parse_stage(name: str) -> tuple[str, int]:
  """(stage, round) of a stage name: "round2/mine" -> ("mine", 2); "mine" -> ("mine", 1); "adapt" -> ("adapt", 0)."""
  m = _ROUND_NAME.match(name)
  if m:
    stage, round_num = m.group(2), int(m.group(1))
    if stage not in ROUND_STAGES or round_num < 2:
      raise ValueError(f"stage {name!r}: only {ROUND_STAGES} have round folders, from round2/ on (round 1 is the "
                       "plain name)")
    return stage, round_num
  return name, 1 if name in ROUND_STAGES else 0


def round_tag(round_num: int) -> str:
  """The name of round `round_num`'s refined model in evaluation and report outputs: "round1", "round2", ...."""
  return f"round{round_num}"


def expand_stages(stages: list[str], rounds: int) -> list[str]:
  """Repeats the contiguous block of plain round stages (mine, calibrate, refine in the given order) `rounds` times,
  round r >= 2 under round<r>/; names that already carry a round ("round2/mine") stay as they are."""
  if not isinstance(rounds, int) or rounds < 1:
    raise ValueError(f"config rounds must be an int >= 1, got {rounds!r}")
  where = [i for i, s in enumerate(stages) if s in ROUND_STAGES]
  if not where:
    return list(stages)
  if where != list(range(where[0], where[-1] + 1)):
    raise ValueError(f"stages {stages}: the round stages {ROUND_STAGES} must be adjacent (config stages / --stages)")
  block = [stages[i] for i in where]
  if len(set(block)) != len(block):
    raise ValueError(f"stages {stages}: a round stage is listed twice")
  looped = [round_stage(s, r) for r in range(1, rounds + 1) for s in block]
  return stages[:where[0]] + looped + stages[where[-1] + 1:]


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def is_done(workdir: str, stage: str) -> bool:
  return files.exists(os.path.join(stage_dir(workdir, stage), MANIFEST))


def read_manifest(workdir: str, stage: str) -> dict:
  path = os.path.join(stage_dir(workdir, stage), MANIFEST)
  if not files.exists(path):
    raise FileNotFoundError(f"{path}: stage {stage!r} has not finished (run it first)")
  text = files.read_text(path)
  try:
    manifest = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: the manifest of stage {stage!r} is not valid JSON ({e}); remove that folder to rerun "
                     "the stage") from e
  if not isinstance(manifest, dict):
    raise ValueError(f"{path}: the manifest of stage {stage!r} is not a JSON object")
  return manifest


STARTED = "started.json"  # what a stage that has not finished yet was started from (its partial files' origin)
SUPERSEDED = "superseded"
ON_CHANGE = ("refuse", "rerun")


def provenance(workdir: str, stage: str, fields: dict, upstream: list[str]) -> dict:
  """What stage `stage` is made from now: its config fields, their digest, and the run ids of the finished upstream
  stages (None for a manifest written without one)."""
  from recall_jax.stages import fingerprint
  inputs = {u: read_manifest(workdir, u).get("run_id") for u in upstream if is_done(workdir, u)}
  return {"fingerprint": fingerprint.digest(fields), "config_fields": fields, "inputs": inputs}


def stale_reasons(recorded: dict, current: dict) -> list[str]:
  """Why artifacts recorded with provenance `recorded` do not belong to `current` ([] when they do)."""
  from recall_jax.stages import fingerprint
  if "config_fields" not in recorded:
    return ["it records no config fingerprint (written by an older version, or by hand)"]
  reasons = [f"config {c}" for c in fingerprint.changed_fields(recorded["config_fields"], current["config_fields"])]
  before, now = recorded.get("inputs", {}), current["inputs"]
  for u in sorted(set(before) | set(now)):
    if before.get(u, "absent") != now.get(u, "absent"):
      reasons.append(f"input stage {u!r} " + ("finished since" if u not in before else "was removed" if u not in now
                                              else "was rerun since"))
  return reasons


def check_stage(workdir: str, stage: str, current: dict) -> list[str]:
  """Why the finished (manifest) or started (started.json) artifacts of `stage` are stale; [] when they are
  current or absent."""
  out = stage_dir(workdir, stage)
  if is_done(workdir, stage):
    return stale_reasons(read_manifest(workdir, stage), current)
  started = os.path.join(out, STARTED)
  if files.exists(started):
    return [f"(partial) {r}" for r in stale_reasons(json.loads(files.read_text(started)), current)]
  return []


def supersede(workdir: str, stage: str) -> str:
  """Moves a stale stage folder (or link) aside to <workdir>/superseded/; returns where it went. Nothing is
  deleted."""
  src = stage_dir(workdir, stage)
  dst = os.path.join(workdir, SUPERSEDED, f"{stage.replace('/', '_')}.{time.strftime('%Y%m%d-%H%M%S')}")
  k = 0
  while files.exists(dst + (f".{k}" if k else "")) or os.path.islink(dst + (f".{k}" if k else "")):
    k += 1
  dst += f".{k}" if k else ""
  files.move(src, dst)  # a link (the study's shared stages) moves as the link
  return dst


class StaleStageError(ValueError):
  """A stage's artifacts were made from another config or other inputs, and the run was told to refuse."""

  def __init__(self, stage: str, path: str, reasons: list[str], advice: str | None = None):
    self.stage, self.reasons = stage, reasons
    advice = advice or (f"Rerun with --on_change=rerun to redo it and the stages after it (the old folder moves to "
                        f"{SUPERSEDED}/), or use another --workdir.")
    super().__init__(f"stage {stage!r} ({path}) was made from something else: " + "; ".join(reasons[:12])
                     + (f"; and {len(reasons) - 12} more" if len(reasons) > 12 else "") + ". " + advice)


def run_stage(workdir: str, stage: str, fn: Callable[[str], dict], *, log: Callable[[str], None] = print,
              current: dict | None = None, on_change: str = "refuse") -> dict:
  """Runs fn(stage_dir) unless the stage's manifest exists; fn returns the manifest (outputs, statistics).

  With `current` (provenance()), finished or partial artifacts made from anything else are never reused: with
  on_change "refuse" that is an error naming the changed fields, with "rerun" the old folder moves to superseded/
  and the stage runs afresh. The manifest records `current` and a new run id.

  Several processes all run fn; process 0 writes (files.py, `parallel.is_writer`). They meet at a barrier before
  the manifest is written (every process has finished the stage) and after (no process reads or skips past a
  stage whose manifest is not there yet); every process returns process 0's manifest."""
  if on_change not in ON_CHANGE:
    raise ValueError(f"on_change must be one of {ON_CHANGE}, got {on_change!r}")
  out = stage_dir(workdir, stage)
  if current is not None:
    reasons = check_stage(workdir, stage, current)
    if reasons and on_change == "refuse":
      raise StaleStageError(stage, out, reasons)
    if reasons:
      if parallel.is_writer():
        log(f"[{stage}] stale ({'; '.join(reasons[:5])}): moved to {supersede(workdir, stage)}")
      parallel.barrier(f"{stage}.superseded")
  if is_done(workdir, stage):
    log(f"[{stage}] done already ({os.path.join(out, MANIFEST)}); skipping")
    return read_manifest(workdir, stage)
  files.makedirs(out)
  if current is not None:
    atomic_write_json(os.path.join(out, STARTED), current)
  t0 = time.perf_counter()
  log(f"[{stage}] starting")
  manifest = dict(fn(out))
  manifest["seconds"] = round(time.perf_counter() - t0, 2)
  manifest["run_id"] = uuid.uuid4().hex
  if current is not None:
    manifest.update(current)
  parallel.barrier(f"{stage}.finished")
  atomic_write_json(os.path.join(out, MANIFEST), manifest)
  tb_logging.log_pictures(out)  # the stage's contact sheets and charts, beside its curves in TensorBoard
  parallel.barrier(f"{stage}.done")
  log(f"[{stage}] finished in {manifest['seconds']:.1f}s")
  return manifest if parallel.is_writer() else read_manifest(workdir, stage)
