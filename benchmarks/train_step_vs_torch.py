"""The contrastive LoRA training step against transformers + peft (PyTorch), interleaved in one run.

Both sides: the same random Qwen2.5-VL (saved by transformers, loaded with our from_pretrained), text 256 wide x 4
layers (8 heads, 2 KV heads, vocab 1024), vision 128 wide x 4 blocks (window 56 px, last block full), one 112 px
image per side (16 merged tokens), `--batch` query/target pairs of 24 / 8 text tokens, LoRA r16 / alpha 64 on the
LLM q/k/v/o/down and the vision MLP down projections (names.LORA_TARGET_REGEX), last-token embeddings, InfoNCE at
tau 0.02, AdamW, fp32. Ours is the trainer's jitted step (`train.step.make_train_step`) on the host batch layout;
theirs is forward + backward + AdamW step with the position ids precomputed (as ours are). The first step's losses
must agree before anything is timed.

  .venv/bin/python -m benchmarks.train_step_vs_torch [--batch 32] [--repeats 15]

Writes benchmarks/results/train_step_<platform>.json (the interleave.interleaved figures, shapes and versions).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax
import numpy as np
import optax
import torch
from flax import nnx

from benchmarks import interleave
from recall_jax.models import lora, qwen2_5_vl
from recall_jax.models.qwen2_5_vl import names
from recall_jax.models.qwen2_5_vl.positions import get_rope_index
from recall_jax.train import step as step_lib

TEXT_TOKENS = {"query": 24, "target": 8}
RANK, ALPHA, TAU, LR = 16, 64.0, 0.02, 1e-4


def benchmark_config():
  return qwen2_5_vl.tiny_config(
      text=dict(vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, mrope_section=(4, 6, 6)),
      vision=dict(depth=4, hidden_size=128, intermediate_size=512, num_heads=4, window_size=56,
                  fullatt_block_indexes=(3,)))


def pipeline_batch(cfg, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A pipeline-layout batch: per side [vision_start, image pads, vision_end, text, <|endoftext|>], one 112 px
  image each (grid 1 x 8 x 8)."""
  rng = np.random.default_rng(seed)
  grid = np.array([1, 8, 8], np.int64)
  out = {}
  for side, n_text in TEXT_TOKENS.items():
    row = lambda: ([cfg.vision_start_token_id] + [cfg.image_token_id] * 16 + [cfg.vision_end_token_id]
                   + rng.integers(300, 1000, n_text).tolist() + [cfg.bos_token_id])
    out[f"{side}_input_ids"] = np.asarray([row() for _ in range(batch)], np.int64)
    out[f"{side}_attention_mask"] = np.ones_like(out[f"{side}_input_ids"])
    out[f"{side}_image_grid_thw"] = np.tile(grid, (batch, 1))
    out[f"{side}_pixel_values"] = rng.standard_normal((batch, 64, cfg.vision.patch_dim)).astype(np.float32)
  out["valid"] = np.ones(batch, bool)
  out["target_ids"] = np.arange(batch, dtype=np.int32)
  out["group_ids"] = np.arange(batch, dtype=np.int32)
  return out


def ours(model, batch: dict[str, np.ndarray]):
  """-> (step(): one blocking step, loss of the first step)."""
  lora.apply_lora(model, names.LORA_TARGET_REGEX, rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(0))
  model.train()
  graphdef, trained, rng_state, rest = nnx.split(model, nnx.LoRAParam, nnx.RngState, ...)
  tx = optax.adamw(LR)
  pure = nnx.to_pure_dict(trained)
  box = {"state": {"adapters": pure, "opt_state": tx.init(pure), "step": np.int32(0),
                   "rng": jax.random.key_data(jax.random.key(0))}}
  train_step = step_lib.make_train_step(graphdef, tx, step_lib.LossConfig(temperature=TAU))
  arrays, geometry = step_lib.host_batch(model.cfg, batch, images_per_call=len(batch["valid"]))
  arrays = jax.device_put(arrays)

  def step():
    box["state"], metrics = train_step(box["state"], (rng_state, rest), arrays, geometry)
    return jax.block_until_ready(metrics)

  return step, float(step()["total_loss"])


def theirs(ref, cfg, batch: dict[str, np.ndarray]):
  import peft
  regex = names.LORA_TARGET_REGEX.replace(r"language_model\.", r".*language_model\.").replace(
      r"|visual\.", r"|.*visual\.")
  model = peft.get_peft_model(ref, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                   target_modules=regex))
  model.train()
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
  inner = model.base_model.model.model
  sides = {}
  for side in TEXT_TOKENS:
    ids, mask, grid = (batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "image_grid_thw"))
    pos, _ = get_rope_index(ids, grid, mask, cfg)
    sides[side] = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                       image_grid_thw=torch.from_numpy(grid), position_ids=torch.from_numpy(pos.astype(np.int64)),
                       pixel_values=torch.from_numpy(batch[f"{side}_pixel_values"].reshape(-1, cfg.vision.patch_dim)))
  labels = torch.arange(len(batch["valid"]))

  def step():
    opt.zero_grad(set_to_none=True)
    q, t = (torch.nn.functional.normalize(inner(**sides[s]).last_hidden_state[:, -1].float(), dim=-1)
            for s in ("query", "target"))
    loss = torch.nn.functional.cross_entropy(q @ t.T / TAU, labels)
    loss.backward()
    opt.step()
    return float(loss)

  return step, step()


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=15)
  args = ap.parse_args()

  cfg = benchmark_config()
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
  d = cfg.to_hf_dict()
  torch.manual_seed(0)
  ref = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(d))
  with tempfile.TemporaryDirectory() as tmp:
    ref.save_pretrained(tmp)
    model = qwen2_5_vl.from_pretrained(tmp)
  batch = pipeline_batch(cfg, args.batch)
  ours_step, ours_loss = ours(model, batch)
  theirs_step, theirs_loss = theirs(ref, cfg, batch)
  if abs(ours_loss - theirs_loss) > 1e-4 * max(1.0, abs(theirs_loss)):
    raise SystemExit(f"the two steps compute different losses: ours {ours_loss:.6f}, torch+peft {theirs_loss:.6f}")
  timing = interleave.interleaved(ours_step, theirs_step, repeats=args.repeats)
  result = {"benchmark": "contrastive LoRA train step", "reference": "transformers + peft", **interleave.machine(),
            "shapes": {"batch": args.batch, "image_px": 112, "image_tokens": 16, "text_tokens": TEXT_TOKENS,
                       "text": "256 x 4", "vision": "128 x 4"},
            "first_step_loss": {"recall_jax": ours_loss, "reference": theirs_loss}, **timing}
  out = os.path.join(os.path.dirname(__file__), "results", f"train_step_{result['platform']}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
