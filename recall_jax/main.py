"""Entry point: `python -m recall_jax.main --config configs/<name>.py --workdir DIR [--stages a,b]`.

Runs the configured stages in order; each writes its artifacts under DIR/<stage>/ and is skipped when its manifest
exists and was made from the same config fields and inputs (stages/fingerprint.py), so an interrupted run resumes
where it stopped and a changed config never mixes with old artifacts (--on_change=refuse|rerun). The config is
written to DIR/config.json, and every run's to DIR/config_history.jsonl. The device mesh (config mesh.shape) is
built once here and handed to every stage that places weights or batches. Launched as several processes
(`parallel.maybe_initialize_distributed`; locally: `python -m recall_jax.launch_local`), every process runs every
stage; process 0 writes the files and the logs.
With config rounds = R, the round stages (mine, calibrate, refine) in the list run R times: round 1 in DIR/mine, ...,
round r >= 2 in DIR/round<r>/mine, ... (`artifacts.expand_stages`). A plain name in --stages means every round;
"round2/mine" names one.
"""

from __future__ import annotations

import json
import logging
import os
import time

from absl import app, flags
from ml_collections import config_flags

from recall_jax import config_check, files, parallel
from recall_jax.stages import artifacts, data_source, fingerprint

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every artifact of the run.", required=True)
_STAGES = flags.DEFINE_list("stages", None, "Stages to run (default: config.stages).")
_ON_CHANGE = flags.DEFINE_enum(
    "on_change", "refuse", list(artifacts.ON_CHANGE),
    "When a stage's artifacts were made from other config fields or inputs: refuse (an error naming what changed, "
    "before anything runs) or rerun it and every stage after it (old folders move to <workdir>/superseded/).")

log = logging.getLogger("recall_jax")


# The stages that put weights or batches on devices: they take the run's mesh.
_PLACED = ("teach", "adapt", "mine", "calibrate", "refine", "evaluate")


def _stage_fns():
  from recall_jax.stages import adapt, calibrate, evaluate, mine, prepare, refine, report, teach
  return {"prepare": prepare.run, "teach": teach.run, "adapt": adapt.run, "mine": mine.run,
          "calibrate": calibrate.run, "refine": refine.run, "evaluate": evaluate.run, "report": report.run}


def _stage_call(fns: dict, cfg, workdir: str, name: str, mesh=None):
  """out_dir -> manifest for one (possibly round-qualified) stage name."""
  stage, round_num = artifacts.parse_stage(name)
  if stage not in fns:
    raise ValueError(f"unknown stage {name!r} (config.stages / --stages); available: {list(fns)} "
                     f"(round stages also as round<r>/<stage>)")
  if round_num > cfg.rounds:
    raise ValueError(f"stage {name!r} is beyond config rounds = {cfg.rounds}")
  kw = {"mesh": mesh} if stage in _PLACED else {}
  if round_num:
    kw["round_num"] = round_num
  return lambda d: fns[stage](cfg, workdir, d, **kw)


def provenance(cfg, workdir: str, stage: str) -> dict:
  """What `stage` is made from under `cfg` now (artifacts.provenance): for run_stage's `current`."""
  return artifacts.provenance(workdir, stage, fingerprint.config_fields(cfg, workdir, stage),
                              fingerprint.upstream_stages(stage, cfg.rounds))


def run(cfg, workdir: str, stages: list[str], on_change: str = "refuse", mesh=None) -> dict:
  """Runs `stages` (expanded over config rounds) in order on `mesh` (default: `parallel.mesh_from_config`);
  returns {stage name: manifest}.

  A stage whose finished or partial artifacts were made from other config fields or inputs (fingerprint.py) is
  refused before anything runs (on_change "refuse"), or redone with the stages after it ("rerun")."""
  if on_change not in artifacts.ON_CHANGE:
    raise ValueError(f"--on_change must be one of {artifacts.ON_CHANGE}, got {on_change!r}")
  fns = _stage_fns()
  config_check.validate(cfg, list(stages))  # every value checked before any stage runs
  mesh = mesh if mesh is not None else parallel.mesh_from_config(cfg)
  config_check.validate(cfg, list(stages), mesh)  # and the batch sizes against the mesh this run has
  for what, where in (("--workdir", workdir), ("config data.root", cfg.data.root),
                      ("config model.checkpoint", cfg.model.checkpoint)):
    if where and files.is_remote(where):
      files.require_reachable(where, what)
  stages = artifacts.expand_stages(list(stages), cfg.rounds)
  calls = {name: _stage_call(fns, cfg, workdir, name, mesh) for name in stages}  # every name checked before any runs
  # A finished input this run does not redo must belong to this config too, or a listed stage would read it.
  inputs = sorted({u for s in stages for u in fingerprint.upstream_stages(s, cfg.rounds)
                   if u not in stages and artifacts.is_done(workdir, u)})
  stale_inputs = {u: r for u in inputs if (r := artifacts.check_stage(workdir, u, provenance(cfg, workdir, u)))}
  if stale_inputs:
    first = next(iter(stale_inputs))
    raise artifacts.StaleStageError(first, artifacts.stage_dir(workdir, first), [
        f"{u} (an input of this run): {r}" for u, rs in stale_inputs.items() for r in rs],
        advice="Add it to --stages (with --on_change=rerun) to redo it, or use another --workdir.")
  if on_change == "refuse":  # every stale stage named before any work starts
    stale = {s: r for s in stages if (r := artifacts.check_stage(workdir, s, provenance(cfg, workdir, s)))}
    if stale:
      first = next(iter(stale))
      raise artifacts.StaleStageError(first, artifacts.stage_dir(workdir, first),
                                      [f"{s}: {r}" for s, rs in stale.items() for r in rs])
  # With data.format "array_record", a missing or incomplete dataset is named before any work, unless this run's
  # prepare stage is to write it (prepare then checks what it wrote).
  reads_data = any(artifacts.parse_stage(s)[0] not in ("prepare", "report") for s in stages)
  prepare_runs = "prepare" in stages and (not artifacts.is_done(workdir, "prepare") or bool(
      artifacts.check_stage(workdir, "prepare", provenance(cfg, workdir, "prepare"))))
  if reads_data and not prepare_runs:
    data_source.require_built(cfg, workdir)
  files.makedirs(workdir)  # a local folder or a bucket path (gs://...): files.py owns the difference
  config = json.loads(cfg.to_json_best_effort())
  artifacts.atomic_write_json(os.path.join(workdir, "config.json"), config)  # the latest; the history below
  files.append_text(os.path.join(workdir, "config_history.jsonl"), json.dumps(
      {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "stages": stages, "on_change": on_change, "config": config},
      sort_keys=True, default=str) + "\n")  # files.py: by the writing process only
  out = {}
  for stage in stages:
    # Provenance is taken when the stage starts: upstream stages rerun just before count with their new run ids.
    out[stage] = artifacts.run_stage(workdir, stage, calls[stage], log=log.info,
                                     current=provenance(cfg, workdir, stage), on_change=on_change)
  return out


def setup_logging() -> None:
  """Our progress lines on stderr, from the writing process (process 0); library chatter (Orbax, absl) and the
  other processes' lines only from warnings up."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
  log.handlers[:] = [handler]
  log.setLevel(logging.INFO if parallel.is_writer() else logging.WARNING)
  log.propagate = False


def main(argv):
  del argv
  parallel.maybe_initialize_distributed()  # first: the process index decides who logs
  setup_logging()
  cfg = _CONFIG.value
  if cfg is None:
    raise app.UsageError("--config is required: a config file, e.g. --config configs/demo.py "
                         "(overrides as --config.train.steps=10)")
  stages = _STAGES.value or [s.strip() for s in cfg.stages.split(",") if s.strip()]
  results = run(cfg, _WORKDIR.value, stages, on_change=_ON_CHANGE.value)
  summary = {s: m.get("metrics") for s, m in results.items() if m.get("metrics")}
  if summary:
    log.info("summary: %s", json.dumps(summary, indent=1, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
