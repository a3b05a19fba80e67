"""The ablation study on the synthetic world (the demo's setting): every row of recall_jax/study.py over 3 training
seeds, one fixed world and foundation model.

Launch (what `bash launch/study.sh` runs):
  python -m recall_jax.study --config configs/study.py --workdir runs/study
Override any field on the command line, e.g. `'--config.study.rows=("baseline", "full")' --config.refine.steps=60`.

Budget, measured on 2 cores (2026-12-01): teach once (the demo's F, reused from the teach cache when launch/demo.sh
ran first; 20 min otherwise), then per seed 19 min on idle cores (adapt, 8 refinements of 80 steps, the
evaluations, 3 minings, 4 calibrations of every mined failure): about 60 min for 3 seeds after teach. study.json
records each row's seconds; fewer rows or `--config.refine.steps` are the levers.
"""

import ml_collections

from configs import demo


def get_config() -> ml_collections.ConfigDict:
  c = demo.get_config()
  # F must write parseable rewrites for the Stage 3 rows to differ: teach it on the world first (shared by all rows).
  c.stages = "prepare,teach,adapt,mine,calibrate,refine,evaluate"
  c.eval.foundation_verification = False  # the demo report's panel; the study compares retrievers only
  # Nothing selected on val: the trainer evaluates (and keeps the "best" of) the final step only, for every row.
  c.train.eval_every = c.train.steps
  c.calibrate.max_records = 0  # every mined failure, as the method (a prefix would come from one category only)
  c.refine.steps = 80  # 8 refinements per seed: the budget's main term (demo: 150)
  c.study = ml_collections.ConfigDict()
  c.study.seeds = (0, 1, 2)  # config.seed per run: training randomness only (world.seed and F stay fixed)
  # Table 4 (baseline, cot, vqa, full), Table 3 (random_mining vs full), Table 7 (hard_negative), the
  # continued-training control (originals), the oracle-F upper bound (oracle_f) and the loop (two_rounds).
  c.study.rows = ("baseline", "cot", "vqa", "full", "random_mining", "hard_negative", "originals", "oracle_f",
                  "two_rounds")
  return c
