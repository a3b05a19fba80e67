"""Entry point: `python -m recall_jax.main --config configs/<name>.py --workdir DIR [--stages a,b]`.

Runs the configured stages in order; each writes its artifacts under DIR/<stage>/ and is skipped when its manifest
exists, so an interrupted run resumes where it stopped. The config used is written to DIR/config.json.
With config rounds = R, the round stages (mine, calibrate, refine) in the list run R times: round 1 in DIR/mine, ...,
round r >= 2 in DIR/round<r>/mine, ... (`artifacts.expand_stages`). A plain name in --stages means every round;
"round2/mine" names one.
"""

from __future__ import annotations

import json
import logging
import os

from absl import app, flags
from ml_collections import config_flags

from recall_jax import parallel
from recall_jax.stages import artifacts

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every artifact of the run.", required=True)
_STAGES = flags.DEFINE_list("stages", None, "Stages to run (default: config.stages).")

log = logging.getLogger("recall_jax")


def _stage_fns():
  from recall_jax.stages import adapt, calibrate, evaluate, mine, prepare, refine, report, teach
  return {"prepare": prepare.run, "teach": teach.run, "adapt": adapt.run, "mine": mine.run,
          "calibrate": calibrate.run, "refine": refine.run, "evaluate": evaluate.run, "report": report.run}


def _stage_call(fns: dict, cfg, workdir: str, name: str):
  """out_dir -> manifest for one (possibly round-qualified) stage name."""
  stage, round_num = artifacts.parse_stage(name)
  if stage not in fns:
    raise ValueError(f"unknown stage {name!r} (config.stages / --stages); available: {list(fns)} "
                     f"(round stages also as round<r>/<stage>)")
  if round_num > cfg.rounds:
    raise ValueError(f"stage {name!r} is beyond config rounds = {cfg.rounds}")
  if round_num:
    return lambda d: fns[stage](cfg, workdir, d, round_num=round_num)
  return lambda d: fns[stage](cfg, workdir, d)


def run(cfg, workdir: str, stages: list[str]) -> dict:
  """Runs `stages` (expanded over config rounds) in order; returns {stage name: manifest}."""
  fns = _stage_fns()
  stages = artifacts.expand_stages(list(stages), cfg.rounds)
  calls = {name: _stage_call(fns, cfg, workdir, name) for name in stages}  # every name checked before any runs
  os.makedirs(workdir, exist_ok=True)
  artifacts.atomic_write_json(os.path.join(workdir, "config.json"), json.loads(cfg.to_json_best_effort()))
  out = {}
  for stage in stages:
    out[stage] = artifacts.run_stage(workdir, stage, calls[stage], log=log.info)
  return out


def setup_logging() -> None:
  """Our progress lines on stderr; library chatter (Orbax, absl) only from warnings up."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
  log.handlers[:] = [handler]
  log.setLevel(logging.INFO)
  log.propagate = False


def main(argv):
  del argv
  setup_logging()
  parallel.maybe_initialize_distributed()
  cfg = _CONFIG.value
  stages = _STAGES.value or [s.strip() for s in cfg.stages.split(",") if s.strip()]
  results = run(cfg, _WORKDIR.value, stages)
  summary = {s: m.get("metrics") for s, m in results.items() if m.get("metrics")}
  if summary:
    log.info("summary: %s", json.dumps(summary, indent=1, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
