"""Gallery embedding throughput (images/s) of the Flax Qwen2.5-VL against the transformers PyTorch reference,
interleaved in the same run (`benchmarks/interleave.py`).

Same random weights (a checkpoint saved by transformers and loaded with our from_pretrained), same inputs (a batch of
retrieval-style prompts, one image each), final hidden states only (what the embedding model uses), fp32, on
whatever device each framework has here (CPU on the dev machines; run it on a GPU machine for GPU figures).

  .venv/bin/python -m benchmarks.forward_vs_transformers [--batch 8] [--image 224] [--text 96] [--layers 4]

Writes benchmarks/results/forward_<platform>.json: images/s of each side and the interleaved ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax
import numpy as np
import torch
from flax import nnx

from benchmarks import interleave
from recall_jax.models import embedding
from recall_jax.models import qwen2_5_vl
from recall_jax.models.qwen2_5_vl.positions import get_rope_index


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--image", type=int, default=224, help="square image side in px (multiple of 28)")
  ap.add_argument("--text", type=int, default=96, help="text tokens per prompt")
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--hidden", type=int, default=512)
  ap.add_argument("--repeats", type=int, default=11)
  args = ap.parse_args()

  cfg = qwen2_5_vl.tiny_config(
      text=dict(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                num_attention_heads=8, num_key_value_heads=2, mrope_section=(8, 12, 12)),
      vision=dict(depth=args.layers, hidden_size=256, intermediate_size=1024, num_heads=4,
                  fullatt_block_indexes=(args.layers - 1,)))
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
  d = cfg.to_hf_dict()
  d["text_config"].update(bos_token_id=256, eos_token_id=256)
  torch.manual_seed(0)
  ref = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(d)).eval()
  with tempfile.TemporaryDirectory() as tmp:
    ref.save_pretrained(tmp)
    model = qwen2_5_vl.from_pretrained(tmp)

  # Inputs: [vision_start, image pads, vision_end, text..., <|endoftext|>] per row, one bucket for all.
  rng = np.random.default_rng(0)
  side = args.image // 14
  grid = np.array([[1, side, side]] * args.batch, np.int64)
  n_img = side * side // 4
  rows = [[cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id]
          + rng.integers(0, 256, args.text).tolist() + [256] for _ in range(args.batch)]
  ids = np.asarray(rows, np.int64)
  mask = np.ones_like(ids)
  pixels = rng.standard_normal((args.batch * side * side, cfg.vision.patch_dim)).astype(np.float32)

  inputs = model.prepare(ids, mask, grid, pixels)
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda g, s, x: embedding.embed(nnx.merge(g, s), x), static_argnums=0)
  ours = lambda: jax.block_until_ready(fwd(graphdef, state, inputs))

  pos, _ = get_rope_index(ids, grid, mask, cfg)
  t_in = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
              pixel_values=torch.from_numpy(pixels), image_grid_thw=torch.from_numpy(grid),
              position_ids=torch.from_numpy(pos.astype(np.int64)))

  def theirs():
    with torch.no_grad():
      ref.model(**t_in)

  timing = interleave.interleaved(ours, theirs, repeats=args.repeats)
  result = {
      "benchmark": "gallery embedding forward", "reference": "transformers", **interleave.machine(),
      "shapes": {"batch": args.batch, "image_px": args.image, "image_tokens": n_img, "text_tokens": args.text,
                 "seq_len": int(ids.shape[1]), "layers": args.layers, "hidden": args.hidden},
      "images_per_s": {side: args.batch / timing["seconds"][side]["median"] for side in ("recall_jax", "reference")},
      **timing,
  }
  out = os.path.join(os.path.dirname(__file__), "results", f"forward_{result['platform']}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
