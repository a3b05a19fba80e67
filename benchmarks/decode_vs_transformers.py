"""Greedy decoding (Stage 3's workload) against transformers' `generate`, interleaved in one run.

The same random Qwen2.5-VL as benchmarks/train_step_vs_torch.py (text 256 x 4, vision 128 x 4), `--batch` prompts of
one 112 px image (16 merged tokens) and `--prompt` text tokens, left padding, `--new` new tokens each with EOS
disabled (-1: every row decodes all of them), fp32. Ours is `generate.Sampler.generate` (jitted prefill + one
while_loop over the KV cache); theirs `generate(do_sample=False)` with M-RoPE positions (mm_token_type_ids). The
tokens must be equal before anything is timed (random weights: the test suite's parity tests pick well-posed data;
here the check is on the greedy tokens of this batch and a mismatch is reported, not hidden).

  .venv/bin/python -m benchmarks.decode_vs_transformers [--batch 16] [--new 64] [--repeats 9]

Writes benchmarks/results/decode_<platform>.json: new tokens/s of each side and the interleaved ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax
import numpy as np
import torch

from benchmarks import interleave
from benchmarks.train_step_vs_torch import benchmark_config
from recall_jax.generate import Sampler
from recall_jax.models import qwen2_5_vl

PAD = 0


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--prompt", type=int, default=32)
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=9)
  args = ap.parse_args()

  cfg = benchmark_config()
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
  torch.manual_seed(0)
  ref = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(cfg.to_hf_dict())).eval()
  with tempfile.TemporaryDirectory() as tmp:
    ref.save_pretrained(tmp)
    model = qwen2_5_vl.from_pretrained(tmp)

  rng = np.random.default_rng(0)
  rows = []
  for b in range(args.batch):
    n_text = args.prompt - b % 4  # a few lengths: left padding is exercised
    rows.append([cfg.vision_start_token_id] + [cfg.image_token_id] * 16 + [cfg.vision_end_token_id]
                + rng.integers(300, 1000, n_text).tolist())
  length = max(map(len, rows))
  ids = np.full((args.batch, length), PAD, np.int64)
  mask = np.zeros_like(ids)
  for b, row in enumerate(rows):
    ids[b, length - len(row):] = row
    mask[b, length - len(row):] = 1
  grid = np.tile(np.array([1, 8, 8], np.int64), (args.batch, 1))
  pixels = rng.standard_normal((args.batch * 64, cfg.vision.patch_dim)).astype(np.float32)

  sampler = Sampler(model, eos_ids=[-1], pad_id=PAD)

  def ours():
    return np.asarray(jax.block_until_ready(sampler.generate(ids, mask, pixels, grid, max_new_tokens=args.new).tokens))

  t_in = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
          "pixel_values": torch.from_numpy(pixels), "image_grid_thw": torch.from_numpy(grid),
          "mm_token_type_ids": torch.from_numpy((ids == cfg.image_token_id).astype(np.int64))}

  def theirs():
    ref.model.rope_deltas = None
    with torch.no_grad():
      out = ref.generate(**t_in, do_sample=False, max_new_tokens=args.new, min_new_tokens=args.new,
                         pad_token_id=PAD, eos_token_id=None)
    return out[:, length:].numpy()

  same = float(np.mean(ours() == theirs()))
  timing = interleave.interleaved(ours, theirs, repeats=args.repeats)
  new_tokens = args.batch * args.new
  result = {"benchmark": "greedy decode", "reference": "transformers generate", **interleave.machine(),
            "shapes": {"batch": args.batch, "prompt_tokens": int(length), "image_tokens": 16, "new_tokens": args.new,
                       "text": "256 x 4", "vision": "128 x 4"},
            "tokens_equal_fraction": same,
            "new_tokens_per_s": {"recall_jax": new_tokens / timing["seconds"]["recall_jax"]["median"],
                                 "reference": new_tokens / timing["seconds"]["reference"]["median"]}, **timing}
  out = os.path.join(os.path.dirname(__file__), "results", f"decode_{result['platform']}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
