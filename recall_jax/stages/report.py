"""The report stage: one place that says what the run achieved, as <workdir>/report.json, report.md and report.png.

It only reads the other stages' manifests and files: the evaluate stage's metrics of the baseline (adapt) and of
every round's refined model, their per-query ground-truth ranks, F's P(yes) per val query (Fig. 1), the mine and
calibrate statistics of every round, the teach stage's quality figures, and every manifest's `seconds`.

"refined" is the last evaluated round (`refined_round`). Optional parts (no teach stage, no foundation verification,
fewer finished rounds than config rounds) are reported as absent and named in `warnings`; numbers that disagree
(ranks that do not reproduce the R@1 of the results, query sets that differ between models) are errors.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import numpy as np
from ml_collections import ConfigDict

from recall_jax import files, viz
from recall_jax.files import atomic_write_text
from recall_jax.stages import artifacts, common

log = logging.getLogger("recall_jax")

REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"
RECALL_KEYS = ("R@1", "R@5", "R@10", "R@50")
SUMMARY_KEYS = ("fashioniq_average",)  # evaluate's derived entries, not splits
MINING_KEYS = ("queries", "failures", "failure_rate", "instances", "instances_per_failing_query",
               "retriever_adapters", "embedding_fingerprints")
CALIBRATION_KEYS = ("mined", "generated", "parsed", "rejected", "kept", "dropped_by_vqa", "keep_rate")
ORACLE_KEYS = ("judged", "rewrite_accuracy", "vqa_agreement", "precision_of_kept", "precision_of_dropped")


def _manifest(workdir: str, stage: str) -> Optional[dict]:
  return artifacts.read_manifest(workdir, stage) if artifacts.is_done(workdir, stage) else None


def _metric_order(key: str) -> tuple:
  """R@k, Rsubset@k, Avg, mAP@k, then the rest, k ascending (manifests store keys sorted as strings)."""
  for rank, prefix in enumerate(("R@", "Rsubset@", "Avg", "mAP@")):
    if key.startswith(prefix):
      tail = key[len(prefix):]
      return rank, int(tail) if tail.isdigit() else 0, key
  return 9, 0, key


def with_mean(per_split: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
  """The splits' metrics (evaluate's summary entries dropped) plus "mean": the mean over splits of every metric
  they all have (FashionIQ: over categories)."""
  splits = {k: {m: v[m] for m in sorted(v, key=_metric_order)} for k, v in per_split.items() if k not in SUMMARY_KEYS}
  if not splits:
    raise ValueError("the evaluate manifest has no per-split metrics")
  shared = [k for k in next(iter(splits.values())) if all(k in m for m in splits.values())]
  return {**splits, "mean": {k: float(np.mean([m[k] for m in splits.values()])) for k in shared}}


def _r1(ranks: list[Optional[int]]) -> Optional[float]:
  return float(100.0 * np.mean([r == 1 for r in ranks])) if ranks else None


def fig1(evaluation: dict) -> Optional[dict]:
  """R@1 of every evaluated model over all val queries, the ones F verifies and the ones it rejects, per split and
  pooled; None without foundation verification."""
  verification = evaluation.get("foundation_verification")
  if not verification or not verification.get("splits"):
    return None
  threshold = verification["threshold"]
  splits, pooled = {}, {"queries": 0, "verified": 0, "R@1": {}}
  pooled_ranks: dict[str, dict[str, list]] = {}
  for tag, info in verification["splits"].items():
    p_yes = json.loads(files.read_text(info["path"]))["p_yes"]
    verified = {qid for qid, p in p_yes.items() if p >= threshold}
    entry = {"queries": len(p_yes), "verified": len(verified), "R@1": {}, "verified_but_missed": {}}
    for model, m in evaluation["models"].items():
      path = os.path.join(m["dir"], f"ranks_{tag}.json")
      ranks = json.loads(files.read_text(path))["ranks"]
      if set(ranks) != set(p_yes):
        raise ValueError(f"{path}: its queries differ from those of {info['path']} (a stale file?)")
      all_r1 = _r1(list(ranks.values()))
      reported = m["metrics"][tag]["R@1"]
      if abs(all_r1 - reported) > 1e-6:
        raise ValueError(f"{path}: R@1 from the ranks is {all_r1:.4f} but the evaluate manifest says {reported:.4f}")
      yes = [r for q, r in ranks.items() if q in verified]
      no = [r for q, r in ranks.items() if q not in verified]
      entry["R@1"][model] = {"all": all_r1, "verified": _r1(yes), "rejected": _r1(no)}
      entry["verified_but_missed"][model] = sum(r != 1 for r in yes)
      bucket = pooled_ranks.setdefault(model, {"all": [], "verified": [], "rejected": []})
      bucket["all"] += list(ranks.values())
      bucket["verified"] += yes
      bucket["rejected"] += no
    splits[tag] = entry
    pooled["queries"] += entry["queries"]
    pooled["verified"] += entry["verified"]
  pooled["R@1"] = {m: {k: _r1(v) for k, v in b.items()} for m, b in pooled_ranks.items()}
  return {"threshold": threshold, "checkpoint": verification["checkpoint"], "splits": splits, "pooled": pooled}


def build(cfg: ConfigDict, workdir: str) -> dict:
  """report.json's content, from the finished stages of `workdir`."""
  evaluation = _manifest(workdir, "evaluate")
  if evaluation is None or "models" not in evaluation:
    raise FileNotFoundError(f"the report needs the evaluate stage's manifest (with per-model metrics) in {workdir}; "
                            "run --stages evaluate first")
  warnings = []
  models = evaluation["models"]
  metrics = {tag: with_mean(m["metrics"]) for tag, m in models.items()}
  evaluated = sorted(int(t[len("round"):]) for t in models if t.startswith("round"))
  refined_round = evaluated[-1] if evaluated else None
  if "baseline" not in models:
    warnings.append("no baseline: the adapt stage had not finished when evaluate ran")
  if refined_round is None:
    warnings.append("no refined model was evaluated (no round's refine had finished)")
  for r in range(1, cfg.rounds + 1):
    if r not in evaluated:
      warnings.append(f"round {r} of config rounds = {cfg.rounds} was not evaluated")

  rounds, mining, calibration = [], {}, {}
  for r in range(1, cfg.rounds + 1):
    tag = artifacts.round_tag(r)
    names = {s: artifacts.round_stage(s, r) for s in artifacts.ROUND_STAGES}
    mined, calibrated, refined = (_manifest(workdir, names[s]) for s in artifacts.ROUND_STAGES)
    if mined:
      mining[tag] = {k: mined.get(k) for k in MINING_KEYS}
    if calibrated:
      stats = calibrated["statistics"]
      calibration[tag] = {**{k: stats.get(k) for k in CALIBRATION_KEYS},
                          "max_records": calibrated.get("max_records"), "vqa_threshold": calibrated.get("vqa_threshold"),
                          "oracle": {k: stats["oracle"].get(k) for k in ORACLE_KEYS} if "oracle" in stats else None}
      if calibrated.get("max_records"):
        warnings.append(f"{tag}: calibrate saw only the first {calibrated['max_records']} mined records "
                        "(config calibrate.max_records)")
    rounds.append({
        "round": r, "tag": tag, "stages": names, "mined_with": mined.get("retriever_adapters") if mined else None,
        "refined_from": refined.get("initialised_from") if refined else None,
        "refine": {k: refined.get(k) for k in ("steps", "best_step", "best_val_metrics", "original_triplets",
                                               "corrective_triplets", "adapter_dir")} if refined else None,
        "metrics": metrics.get(tag), "finished": {s: m is not None for s, m in zip(
            artifacts.ROUND_STAGES, (mined, calibrated, refined))},
    })

  teach = _manifest(workdir, "teach")
  foundation = {"checkpoint": common.foundation_checkpoint(cfg, workdir), "taught": teach is not None,
                "quality": (teach or {}).get("quality")}
  if teach is not None and not foundation["quality"]:
    warnings.append("the teach manifest has no quality figures")

  stages = ["prepare", "teach", "adapt",
            *[artifacts.round_stage(s, r) for r in range(1, cfg.rounds + 1) for s in artifacts.ROUND_STAGES],
            "evaluate"]
  seconds = {s: m.get("seconds") for s in stages if (m := _manifest(workdir, s)) is not None}
  figure = fig1(evaluation)
  if figure is None:
    warnings.append("no foundation verification of the val queries (config eval.foundation_verification): no Fig. 1")
  return {
      "dataset": cfg.data.dataset, "split": evaluation.get("split"), "rounds_configured": cfg.rounds,
      "refined_round": refined_round, "baseline": metrics.get("baseline"),
      "refined": metrics.get(artifacts.round_tag(refined_round)) if refined_round else None,
      "models": metrics, "rounds": rounds, "mining": mining, "calibration": calibration, "foundation": foundation,
      "fig1": figure, "stage_seconds": seconds, "warnings": warnings,
  }


# ---------------------------------------------------------------------------------------------------------------------
# report.md


def _fmt(v: Any, digits: int = 2) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.{digits}f}"
  return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
  return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
          *["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows], ""]


def markdown(report: dict) -> str:
  lines = [f"# ReCALL report: {report['dataset']} {report['split']}", ""]
  if report["warnings"]:
    lines += ["**Notes**", "", *[f"- {w}" for w in report["warnings"]], ""]
  lines += [f"Baseline = adapt's adapters; refined = round {report['refined_round']}'s refine "
            f"(config rounds = {report['rounds_configured']}). Recall in %.", ""]
  models = report["models"]
  splits = list(next(iter(models.values()))) if models else []
  for split in splits:
    keys = list(next(iter(models.values()))[split])
    lines += [f"## {split}", "", *_table(["model", *keys], [[t, *[m[split].get(k) for k in keys]]
                                                          for t, m in models.items()])]
  if report["fig1"]:
    f = report["fig1"]
    p = f["pooled"]
    lines += ["## Fig. 1: R@1 over the val queries F verifies", "",
              f"F = {f['checkpoint']}; verified = P(yes) of the verify prompt over (reference, ground truth, text) "
              f">= {f['threshold']}: {p['verified']} of {p['queries']} queries.", "",
              *_table(["model", "all", f"F verifies ({p['verified']})", f"F rejects ({p['queries'] - p['verified']})"],
                      [[t, r["all"], r["verified"], r["rejected"]] for t, r in p["R@1"].items()])]
  lines += ["## Rounds", ""]
  rows = []
  for r in report["rounds"]:
    mi, ca = report["mining"].get(r["tag"], {}), report["calibration"].get(r["tag"], {})
    oracle = ca.get("oracle") or {}
    rows.append([r["tag"], mi.get("queries"), mi.get("failures"), mi.get("instances"), ca.get("generated"),
                 ca.get("parsed"), ca.get("kept"), ca.get("dropped_by_vqa"), oracle.get("precision_of_kept"),
                 oracle.get("precision_of_dropped"), (r["refine"] or {}).get("corrective_triplets")])
  lines += _table(["round", "queries", "failures", "instances", "generated", "parsed", "kept", "dropped by VQA",
                   "precision kept", "precision dropped", "corrective used"], rows)
  q = report["foundation"]
  lines += ["## Foundation model", "", f"checkpoint: {q['checkpoint'] or '-'}; taught: {q['taught']}", ""]
  if q["quality"]:
    lines += _table(["figure", "value"], _figures(q["quality"]))
    examples = q["quality"].get("examples") or {}
    for kind in ("rewrites", "verify"):
      for e in examples.get(kind, []):
        lines.append(f"- {kind[:-1] if kind == 'rewrites' else kind}: {json.dumps(e, sort_keys=True)}")
    lines.append("")
  lines += ["## Time per stage (s)", "", *_table(["stage", "seconds"], [[k, v] for k, v in
                                                                        report["stage_seconds"].items()])]
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# report.png


def _figures(quality: dict) -> list[list]:
  """F's scalar figures (the counts, the examples and the settings are listed apart)."""
  return [[k, v] for k, v in quality.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]


def picture(report: dict, path: str) -> str:
  models = report["models"]
  splits = list(next(iter(models.values()))) if models else []
  if len(splits) == 2:  # one split and its mean: show it once
    splits = splits[:1]
  charts = [viz.bar_chart(f"{k} per split (%)", [s.replace("fashioniq_", "") for s in splits],
                          [(t, [m[s].get(k) for s in splits]) for t, m in models.items()])
            for k in ("R@1", "R@10")]
  row2 = []
  if report["fig1"]:
    p = report["fig1"]["pooled"]
    row2.append(viz.bar_chart(
        "Fig. 1: R@1 (%) by F's verdict", ["all", f"F verifies ({p['verified']})",
                                           f"F rejects ({p['queries'] - p['verified']})"],
        [(t, [r["all"], r["verified"], r["rejected"]]) for t, r in p["R@1"].items()]))
  rows = []
  for r in report["rounds"]:
    mi, ca = report["mining"].get(r["tag"], {}), report["calibration"].get(r["tag"], {})
    oracle = ca.get("oracle") or {}
    rows.append([r["tag"], mi.get("failures"), mi.get("instances"), ca.get("generated"), ca.get("parsed"),
                 ca.get("kept"), ca.get("dropped_by_vqa"), _fmt(oracle.get("precision_of_kept")),
                 _fmt(oracle.get("precision_of_dropped"))])
  row2.append(viz.table_image("Stage 2 / Stage 3 per round", ["round", "failures", "instances", "generated",
                                                               "parsed", "kept", "VQA drop", "prec kept",
                                                               "prec drop"], rows, col_width=66, first_col_width=60))
  row3 = [viz.table_image("time per stage (s)", ["stage", "seconds"],
                          [[k, _fmt(v, 1)] for k, v in report["stage_seconds"].items()], first_col_width=140)]
  if report["foundation"]["quality"]:
    row3.append(viz.table_image("F quality (teach)", ["figure", "value"],
                                [[k, _fmt(v, 3)] for k, v in _figures(report["foundation"]["quality"])],
                                first_col_width=170))
  title = (f"ReCALL {report['dataset']} {report['split']}: baseline vs refined (round {report['refined_round']})"
           + (f"  [{len(report['warnings'])} notes in report.md]" if report["warnings"] else ""))
  return viz.compose([charts, row2, row3], path, title=title)


def run(cfg: ConfigDict, workdir: str, out: str) -> dict:
  report = build(cfg, workdir)
  paths = {"json": os.path.join(workdir, REPORT_JSON), "md": os.path.join(workdir, REPORT_MD),
           "png": os.path.join(workdir, REPORT_PNG)}
  artifacts.atomic_write_json(paths["json"], report)
  atomic_write_text(paths["md"], markdown(report))
  picture(report, paths["png"])
  for w in report["warnings"]:
    log.warning("[report] %s", w)
  headline = {t: {k: report[t]["mean"].get(k) for k in RECALL_KEYS}
              for t in ("baseline", "refined") if report[t]}
  return {"outputs": paths, "warnings": report["warnings"], "metrics": headline,
          "refined_round": report["refined_round"]}
