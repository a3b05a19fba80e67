"""Probe: which part of F's two-turn verification reading is wrong? Reads a finished run's Stage-3 records
(<workdir>/calibrate/generations.jsonl, calibrate.verify_turns = 2) and compares each part of F's reading with the
oracle's (sft.verify_turn_answers): Picture 1's caption, the asked slots, Picture 2's caption, the checks, and the
decision against oracle.judge. These are train-split records (what Stage 3 verifies), never val.

  python probes/verify_parts.py --workdir runs/demo

Measured 2026-12-03 on the run of 082e3f9 (checks without values, 758 items): Picture 1 caption 756 right, asked
slots 573, Picture 2 caption 704, checks 199; F said yes to 683 (186 true), agreement 0.32. The checks' errors were
"same" for a differing attribute: sleeves 228, length 228, pattern 126, neckline 107 (colour 12). That led to
sft.attribute_comparisons (both values before same/differs).
"""
import argparse
import collections
import json
import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from configs import demo
from recall_jax.data.synthetic.language import TextParseError
from recall_jax.data.synthetic.oracle import Oracle
from recall_jax.generate import sft
from recall_jax.stages import common

p = argparse.ArgumentParser()
p.add_argument("--workdir", default="runs/demo")
p.add_argument("--show", type=int, default=3, help="wrong decisions to print")
args = p.parse_args()

splits = common.read_splits(demo.get_config(), args.workdir, "train")
oracle = Oracle({n: path for s in splits for n, path in s.images.items()})
stats, slot_errors, check_errors = collections.Counter(), collections.Counter(), collections.Counter()
shown = 0


def parts(first: str, second: str) -> tuple[str, str, str, str]:
  """(caption 1, asked slots, caption 2, checks as "<attribute> same|differs"): a run with the checks' values
  written (sft.attribute_comparisons) and one without compare alike."""
  caption_1, asked = first.split(f". {sft.ASKED_MARKER} ", 1)
  caption_2, checks = second.split(f". {sft.CHECK_MARKER} ", 1)
  checks = checks.split(f". {sft.ANSWER_MARKER}", 1)[0].split(", ")
  return caption_1, asked, caption_2, ", ".join(f"{c.split(' ')[0]} {c.rsplit(' ', 1)[-1]}" for c in checks)


for line in open(f"{args.workdir}/calibrate/generations.jsonl"):
  r = json.loads(line)
  if r.get("verify_turns") != 2 or not r.get("verify_text"):
    stats["not_two_turn"] += 1
    continue
  try:
    want = sft.verify_turn_answers(oracle, r["reference"], r["instance"], r["text"])
  except TextParseError:  # F's new text contradicts itself: no reading to compare with
    want = None
  if want is None:
    stats["no_oracle_reading"] += 1
    continue
  first, second = r["verify_text"].split("\n", 1)
  try:
    got = parts(first, second)
  except ValueError:
    stats["reading_unparsed"] += 1
    continue
  expected = parts(*want)
  truth, said = oracle.judge(r["reference"], r["text"], r["instance"]), second.rstrip().endswith("yes")
  stats["items"] += 1
  for name, a, b in zip(("caption_1", "asked", "caption_2", "checks"), got, expected):
    stats[f"{name}_right"] += a == b
  stats["truly_yes"] += truth
  stats["said_yes"] += said
  stats["agree"] += said == truth
  for a, b in zip(got[1].split(", "), expected[1].split(", ")):
    slot_errors[b.split(" ")[0]] += a != b
  for a, b in zip(got[3].split(", "), expected[3].split(", ")):
    check_errors[b] += a != b
  if shown < args.show and said != truth:
    shown += 1
    print(f"text: {r['text']}\n  F:      {first}\n  oracle: {want[0]}\n  F:      {second}\n  oracle: {want[1]}\n")

n = max(stats["items"], 1)
print(json.dumps({**stats, "agreement": round(stats["agree"] / n, 3),
                  "asked_slot_errors": dict(slot_errors), "check_errors": dict(check_errors)}, indent=1))
