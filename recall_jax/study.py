"""The ablation study: the paper's ablation rows on one fixed world, over several training seeds, in one command.

  python -m recall_jax.study --config configs/study.py --workdir runs/study     (= bash launch/study.sh)

Pure orchestration over `main.run`: every row is a config switch on the study's base config (the full method is
the default), run in its own workdir <workdir>/seed<s>/<row>/. Stages that rows share are
computed once and linked into the rows that use them (a symlink per stage folder, so each row's manifests are found
where the stages look for them):
  * <workdir>/shared: prepare (+ teach): the world and the foundation model F, fixed for the whole study;
  * per seed, the baseline row's adapt (Stage 1) for every row; the full row's self-guided mine (and calibrate) for
    the rows that differ only after it. The "+ CoT generation" row re-filters the full row's generations without the
    VQA filter (calibrate.seed_partial): the same generations, only the keep decision differs.
`config.seed` (training randomness, and the random-mining draws) takes each value of study.seeds; world.seed and F
stay fixed. Metrics are the evaluate stage's on config eval.split, for the row's model (baseline, round1 or round2);
nothing is selected on them. Outputs in the workdir: study.json (every seed's metrics, mean and std per row),
study.md (mean ± std, sample std over seeds) and study.png (bars with error bars).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from typing import Optional, Sequence

import numpy as np
from ml_collections import ConfigDict

from recall_jax import files, viz
from recall_jax.stages import artifacts, calibrate, paths

log = logging.getLogger("recall_jax")

SHARED_STAGES = ("prepare", "teach")
STUDY_JSON, STUDY_MD, STUDY_PNG = "study.json", "study.md", "study.png"
HEADLINE = ("R@10", "R@1")


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of the study.

  overrides: config switches (dotted keys) on top of the study config; stages: what the row runs itself (after
  linking); borrow: stage -> the row whose finished stage folder is linked in; generations_from: the row whose
  calibrate generations this row's calibrate re-filters; model: the evaluate stage's model tag that is the result."""

  name: str
  label: str
  table: str
  overrides: dict
  stages: tuple[str, ...]
  borrow: dict
  model: str = "round1"
  generations_from: Optional[str] = None


_AFTER_ADAPT = {"adapt": "baseline"}
_AFTER_MINE = {"adapt": "baseline", "mine": "full"}
ROWS = {r.name: r for r in (
    Row("baseline", "baseline (Stage 1 adapters)", "Table 4", {}, ("adapt", "evaluate"), {}, model="baseline"),
    Row("cot", "+ CoT generation (no VQA filter; random batches)", "Table 4",
        {"calibrate.vqa_filter": False, "refine.grouped": False}, ("calibrate", "refine", "evaluate"), _AFTER_MINE,
        generations_from="full"),
    Row("vqa", "+ VQA filter (random batches)", "Table 4", {"refine.grouped": False}, ("refine", "evaluate"),
        {**_AFTER_MINE, "calibrate": "full"}),
    Row("full", "+ grouped refinement (= full ReCALL)", "Table 4", {},
        ("mine", "calibrate", "refine", "evaluate"), _AFTER_ADAPT),
    Row("random_mining", "random mining (top-50 pool)", "Table 3", {"mine.strategy": "random"},
        ("mine", "calibrate", "refine", "evaluate"), _AFTER_ADAPT),
    Row("hard_negative", "hard negatives, no text edits", "Table 7", {"refine.mode": "hard_negative"},
        ("refine", "evaluate"), _AFTER_MINE),
    Row("originals", "continued training on the originals only", "control", {"refine.mode": "originals"},
        ("refine", "evaluate"), _AFTER_ADAPT),
    # The oracle's rewrites are true by construction, so none is left to F's verification to drop.
    Row("oracle_f", "oracle F (the oracle writes the rewrites, all kept)", "upper bound",
        {"calibrate.rewriter": "oracle", "calibrate.vqa_filter": False}, ("calibrate", "refine", "evaluate"),
        _AFTER_MINE),
    Row("two_rounds", "2 rounds", "loop", {"rounds": 2},
        ("round2/mine", "round2/calibrate", "round2/refine", "evaluate"),
        {**_AFTER_MINE, "calibrate": "full", "refine": "full"}, model="round2"),
)}


def row_config(cfg: ConfigDict, row: Row, seed: int, checkpoint: Optional[str]) -> ConfigDict:
  """The study config with the row's switches, training seed `seed` and the shared base checkpoint."""
  out = copy.deepcopy(cfg)
  with out.unlocked():
    del out["study"]
    out.seed = int(seed)
    out.mine.seed = int(seed)  # the random-mining draws are training randomness too
    if checkpoint is not None:
      out.model.checkpoint = checkpoint  # one base for every row, whatever folder a row sees it through
    out.stages = ",".join(row.stages)
  for key, value in row.overrides.items():
    *path, leaf = key.split(".")
    node = out
    for part in path:
      node = node.get(part)
      if not isinstance(node, ConfigDict):
        break
    if not isinstance(node, ConfigDict) or leaf not in node:
      raise KeyError(f"study row {row.name!r} switches config {key!r}, which the config does not have")
    node[leaf] = value
  return out


def headline(summary: dict) -> dict[str, float]:
  """R@10 and R@1 of one evaluation: FashionIQ's means over categories, else the mean over splits."""
  if "fashioniq_average" in summary:
    avg = summary["fashioniq_average"]
    return {k: float(avg[f"mean_{k}"]) for k in HEADLINE}
  splits = [m for m in summary.values() if isinstance(m, dict)]
  return {k: float(np.mean([m[k] for m in splits])) for k in HEADLINE}


def flatten(summary: dict) -> dict[str, float]:
  """{"<split>/<metric>": value} of an evaluation summary."""
  return {f"{split}/{k}": float(v) for split, m in summary.items() for k, v in m.items()}


def aggregate(per_seed: Sequence[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
  """(mean, sample std over seeds; 0 for one seed) of every metric all seeds have."""
  keys = [k for k in per_seed[0] if all(k in m for m in per_seed)]
  values = {k: np.asarray([m[k] for m in per_seed], np.float64) for k in keys}
  return ({k: float(v.mean()) for k, v in values.items()},
          {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()})


class Study:
  """Runs the rows of one study config under `workdir` (absolute), each stage at most once per seed."""

  def __init__(self, cfg: ConfigDict, workdir: str, run_fn=None):
    from recall_jax import main
    s = cfg.study
    unknown = [r for r in s.rows if r not in ROWS]
    if unknown or not s.rows:
      raise ValueError(f"config study.rows must be a non-empty subset of {list(ROWS)}, got {list(s.rows)}")
    if not s.seeds or len(set(s.seeds)) != len(s.seeds):
      raise ValueError(f"config study.seeds must be distinct training seeds, got {list(s.seeds)}")
    if files.is_remote(workdir):  # the rows share stages by symbolic links, which a bucket does not have
      raise ValueError(f"study --workdir {workdir}: must be a local folder (rows link the stages they share); a "
                       "single run (recall_jax.main) may use a bucket workdir")
    self.cfg, self.workdir = cfg, os.path.abspath(workdir)
    self.run_fn = run_fn or main.run
    self.shared = os.path.join(self.workdir, "shared")
    self.checkpoint: Optional[str] = None
    self._ensured: set = set()

  def row_dir(self, seed: int, row: str) -> str:
    return os.path.join(self.workdir, f"seed{seed}", row)

  def prepare_shared(self) -> None:
    """The world and F, once for the study (the config's prepare / teach stages)."""
    stages = [s.strip() for s in self.cfg.stages.split(",") if s.strip() in SHARED_STAGES]
    if stages:
      self.run_fn(self.cfg, self.shared, stages)
    if self.cfg.model.checkpoint == "":  # prepare's tiny base: every row reads it from the shared folder
      self.checkpoint = os.path.realpath(paths.checkpoint_dir(self.cfg, self.shared))

  def _link(self, source_dir: str, stage: str, target_dir: str) -> None:
    src = os.path.realpath(artifacts.stage_dir(source_dir, stage))
    if not os.path.exists(os.path.join(src, artifacts.MANIFEST)):
      raise FileNotFoundError(f"stage {stage!r} has not finished in {source_dir}")
    dst = artifacts.stage_dir(target_dir, stage)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.islink(dst) and os.path.realpath(dst) == src:
      return
    if os.path.lexists(dst):
      raise FileExistsError(f"{dst} exists and is not a link to {src}: remove it to share {stage!r} again")
    os.symlink(src, dst)

  def ensure(self, seed: int, name: str, stages: Sequence[str]) -> str:
    """Runs row `name`'s own stages for `seed` up to the last of `stages`, after linking what it borrows (running
    the donors' stages first); returns the row's workdir."""
    row, wd = ROWS[name], self.row_dir(seed, name)
    os.makedirs(wd, exist_ok=True)
    for stage in SHARED_STAGES:
      if artifacts.is_done(self.shared, stage):
        self._link(self.shared, stage, wd)
    for stage, donor in row.borrow.items():
      self._link(self.ensure(seed, donor, [stage]), stage, wd)
    cfg = row_config(self.cfg, row, seed, self.checkpoint)
    last = max([row.stages.index(s) for s in stages if s in row.stages], default=-1)
    todo = [s for s in row.stages[:last + 1] if (seed, name, s) not in self._ensured]
    if "calibrate" in todo and row.generations_from and not artifacts.is_done(wd, "calibrate"):
      self._seed_generations(seed, row, wd)
    if todo:
      log.info("[study] seed %d, row %s: %s", seed, name, ",".join(todo))
      self.run_fn(cfg, wd, todo)
      self._ensured.update((seed, name, s) for s in todo)
    return wd

  def _seed_generations(self, seed: int, row: Row, wd: str) -> None:
    donor = self.ensure(seed, row.generations_from, ["calibrate"])
    out = artifacts.stage_dir(wd, "calibrate")
    os.makedirs(out, exist_ok=True)
    if not os.path.exists(os.path.join(out, calibrate.PARTIAL)):
      calibrate.seed_partial(artifacts.read_manifest(donor, "calibrate")["outputs"]["generations"], out)

  def result(self, seed: int, name: str) -> dict:
    """The row's metrics for one seed, from its evaluate manifest, and the seconds its own stages took."""
    row, wd = ROWS[name], self.row_dir(seed, name)
    evaluation = artifacts.read_manifest(wd, "evaluate")
    if row.model not in evaluation["metrics"]:
      raise KeyError(f"{wd}/evaluate has no model {row.model!r} (has {sorted(evaluation['metrics'])})")
    summary = evaluation["metrics"][row.model]
    seconds = sum(artifacts.read_manifest(wd, s).get("seconds", 0.0) for s in row.stages)
    return {"headline": headline(summary), "metrics": flatten(summary), "seconds": round(seconds, 1)}

  def run(self) -> dict:
    self.prepare_shared()
    seeds, names = [int(s) for s in self.cfg.study.seeds], list(self.cfg.study.rows)
    per_seed = {name: {} for name in names}
    for seed in seeds:
      for name in names:
        self.ensure(seed, name, ROWS[name].stages)
        per_seed[name][seed] = self.result(seed, name)
    return summarize(self.cfg, self.workdir, seeds, names, per_seed)


def summarize(cfg: ConfigDict, workdir: str, seeds: list[int], names: list[str], per_seed: dict) -> dict:
  rows = []
  for name in names:
    row, results = ROWS[name], [per_seed[name][s] for s in seeds]
    mean, std = aggregate([{**r["metrics"], **{f"headline/{k}": v for k, v in r["headline"].items()}}
                           for r in results])
    rows.append({"name": name, "label": row.label, "table": row.table, "overrides": row.overrides,
                 "model": row.model, "mean": mean, "std": std, "seeds": dict(zip(map(str, seeds), results)),
                 "seconds_mean": float(np.mean([r["seconds"] for r in results]))})
  return {"workdir": workdir, "dataset": cfg.data.dataset, "split": cfg.eval.split, "seeds": seeds,
          "world_seed": cfg.world.seed, "headline": list(HEADLINE), "rows": rows}


def markdown(study: dict) -> str:
  seeds = study["seeds"]
  lines = [f"# Ablation study ({study['dataset']} synthetic world, {study['split']} split, seeds {seeds})", "",
           f"Mean ± sample std over {len(seeds)} training seed(s); world seed {study['world_seed']} fixed. "
           "R@k in %; FashionIQ: means over the categories.", "",
           "| table | row | " + " | ".join(f"{k} (mean ± std)" for k in study["headline"])
           + " | switches | s / seed |",
           "|---|---|" + "---|" * len(study["headline"]) + "---|---|"]
  for r in study["rows"]:
    cells = [f"{r['mean'][f'headline/{k}']:.2f} ± {r['std'][f'headline/{k}']:.2f}" for k in study["headline"]]
    switches = ", ".join(f"`{k}={v}`" for k, v in r["overrides"].items()) or "(defaults)"
    lines.append(f"| {r['table']} | {r['label']} | " + " | ".join(cells) + f" | {switches} | "
                 f"{r['seconds_mean']:.0f} |")
  lines += ["", "Every metric per row (mean ± std):", ""]
  keys = [k for k in study["rows"][0]["mean"] if not k.startswith("headline/")]
  lines += ["| row | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
  for r in study["rows"]:
    lines.append(f"| {r['name']} | " + " | ".join(
        f"{r['mean'][k]:.2f} ± {r['std'][k]:.2f}" if k in r["mean"] else "-" for k in keys) + " |")
  return "\n".join(lines) + "\n"


def picture(study: dict, path: str) -> str:
  """Horizontal bars (mean) with error bars (± std), one panel per headline metric, rows top to bottom."""
  from PIL import Image, ImageDraw
  rows, keys = study["rows"], study["headline"]
  label_w, plot_w, bar_h, gap, top, pad = 360, 320, 16, 8, 40, 10
  panel_h = top + len(rows) * (bar_h + gap) + 24
  width = label_w + len(keys) * (plot_w + pad) + pad
  img = Image.new("RGB", (width, panel_h + 30), "white")
  draw = ImageDraw.Draw(img)
  draw.text((pad, 6), f"Ablations: mean ± std over seeds {study['seeds']} ({study['split']})", fill="black",
            font=viz._font(16))
  for i, r in enumerate(rows):
    y = 30 + top + i * (bar_h + gap)
    draw.text((pad, y + 2), r["label"] if len(r["label"]) <= 50 else r["label"][:49] + "…", fill="black",
              font=viz._font(12))
  for p, key in enumerate(keys):
    x0 = label_w + p * (plot_w + pad)
    highs = [r["mean"][f"headline/{key}"] + r["std"][f"headline/{key}"] for r in rows]
    x_max = max(10.0, float(np.ceil(1.2 * max(highs) / 10.0) * 10.0))  # room right of the bars for the values
    draw.text((x0, 30 + 8), f"{key} (%), axis 0-{x_max:.0f}", fill="black", font=viz._font(14))
    draw.line([x0, 30 + top - 4, x0, 30 + panel_h - 24], fill="black")
    for i, r in enumerate(rows):
      m, s = r["mean"][f"headline/{key}"], r["std"][f"headline/{key}"]
      y = 30 + top + i * (bar_h + gap)
      colour = viz.SERIES_COLOURS[1] if r["name"] == "full" else viz.SERIES_COLOURS[0]
      draw.rectangle([x0, y, x0 + plot_w * m / x_max, y + bar_h], fill=colour)
      lo, hi = x0 + plot_w * max(m - s, 0.0) / x_max, x0 + plot_w * min(m + s, x_max) / x_max
      mid = y + bar_h // 2
      draw.line([lo, mid, hi, mid], fill="black", width=2)
      draw.line([lo, y + 3, lo, y + bar_h - 3], fill="black", width=2)
      draw.line([hi, y + 3, hi, y + bar_h - 3], fill="black", width=2)
      draw.text((hi + 4, y + 2), f"{m:.1f}±{s:.1f}", fill="black", font=viz._font(10))
  return viz.save_png(img, path)


def write(study: dict, workdir: str) -> dict[str, str]:
  paths = {k: os.path.join(workdir, name) for k, name in (("json", STUDY_JSON), ("md", STUDY_MD),
                                                          ("png", STUDY_PNG))}
  files.atomic_write_json(paths["json"], study, indent=2, sort_keys=True)
  files.atomic_write_text(paths["md"], markdown(study))
  picture(study, paths["png"])
  return paths


def run(cfg: ConfigDict, workdir: str, run_fn=None) -> dict:
  """Runs (or resumes: finished stages are skipped) the study and writes study.json / .md / .png."""
  study = Study(cfg, workdir, run_fn).run()
  study["outputs"] = write(study, os.path.abspath(workdir))
  return study


def main(argv):
  del argv
  import jax

  from recall_jax import main as main_lib, parallel
  main_lib.setup_logging()
  parallel.maybe_initialize_distributed()
  workdir = main_lib._WORKDIR.value
  if not jax.config.jax_compilation_cache_dir:  # the rows' trainings compile the same few steps
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(workdir), "jit_cache"))
  study = run(main_lib._CONFIG.value, workdir)
  log.info("[study] %s", json.dumps({r["name"]: {k: round(r["mean"][f"headline/{k}"], 2) for k in HEADLINE}
                                     for r in study["rows"]}))
  log.info("[study] wrote %s", ", ".join(study["outputs"].values()))


if __name__ == "__main__":
  from absl import app

  from recall_jax import main as _flags  # noqa: F401  (its --config and --workdir flags are the study's)
  app.run(main)
