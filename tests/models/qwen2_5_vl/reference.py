"""The PyTorch reference for the Qwen2.5-VL tests: tiny random transformers models, checkpoints and inputs.

transformers 5.23 pitfall: without mm_token_type_ids or explicit position_ids the model silently uses 1-D
positions, and it caches rope_deltas between calls. `reference_forward` therefore computes the 3-D positions
with transformers' own get_rope_index and always passes them explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from recall_jax.models.qwen2_5_vl.config import Qwen25VLConfig

PAD_TOKEN_ID = 256  # <|endoftext|> of the tiny tokenizer


def hf_config(cfg: Qwen25VLConfig) -> Qwen2_5_VLConfig:
  d = cfg.to_hf_dict()
  # transformers' defaults are the real vocabulary's ids; keep them inside the tiny one.
  d["text_config"].update(bos_token_id=PAD_TOKEN_ID, eos_token_id=PAD_TOKEN_ID)
  return Qwen2_5_VLConfig.from_dict(d)


def build_reference(cfg: Qwen25VLConfig, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
  """A random fp32 transformers model; norm scales and biases are perturbed too (HF inits them to 1 / 0), so
  the tests see every parameter."""
  torch.manual_seed(seed)
  model = Qwen2_5_VLForConditionalGeneration(hf_config(cfg)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name or "ln_q" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def save_reference(cfg: Qwen25VLConfig, directory: str, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
  model = build_reference(cfg, seed)
  model.save_pretrained(directory)
  assert os.path.exists(os.path.join(directory, "model.safetensors"))
  return model


def make_batch(cfg: Qwen25VLConfig, rows: Sequence[Sequence[int | tuple[int, int, int]]],
               seed: int = 0) -> dict[str, np.ndarray]:
  """Left-padded inputs as the HF processor lays them out. A row is a list of segments: an int n is n random
  text tokens, a (t, h, w) grid is <|vision_start|> + its image pads + <|vision_end|>."""
  rng = np.random.default_rng(seed)
  merge = cfg.vision.spatial_merge_size
  seqs, grids = [], []
  for row in rows:
    seq = []
    for seg in row:
      if isinstance(seg, int):
        seq += rng.integers(0, 256, size=seg).tolist()
      else:
        grids.append(seg)
        n = int(np.prod(seg)) // merge**2
        seq += [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]
    seqs.append(seq)
  length = max(map(len, seqs))
  input_ids = np.full((len(seqs), length), PAD_TOKEN_ID, np.int64)
  attention_mask = np.zeros((len(seqs), length), np.int64)
  for i, seq in enumerate(seqs):
    input_ids[i, length - len(seq):] = seq
    attention_mask[i, length - len(seq):] = 1
  batch = {"input_ids": input_ids, "attention_mask": attention_mask}
  if grids:
    grid_thw = np.asarray(grids, np.int64)
    num_patches = int(grid_thw.prod(-1).sum())
    batch["image_grid_thw"] = grid_thw
    batch["pixel_values"] = rng.standard_normal((num_patches, cfg.vision.patch_dim)).astype(np.float32)
  return batch


def reference_position_ids(model: Qwen2_5_VLForConditionalGeneration, batch: dict[str, np.ndarray],
                           position_mode: str = "mrope") -> torch.Tensor:
  """transformers' get_rope_index (mrope), or HF generation's 1-D positions (sequential)."""
  ids = torch.from_numpy(batch["input_ids"])
  mask = torch.from_numpy(batch["attention_mask"])
  if position_mode == "sequential":
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
  grid = batch.get("image_grid_thw")
  mm_token_type_ids = (ids == model.config.image_token_id).int()
  position_ids, _ = model.model.get_rope_index(
      ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=None if grid is None else torch.from_numpy(grid),
      attention_mask=mask)
  return position_ids


@torch.no_grad()
def reference_forward(model: Qwen2_5_VLForConditionalGeneration, batch: dict[str, np.ndarray],
                      position_mode: str = "mrope") -> dict[str, np.ndarray]:
  """Final hidden states (after the norm) and logits, as fp32 numpy."""
  model.model.rope_deltas = None
  dtype = next(model.parameters()).dtype
  kwargs = {"input_ids": torch.from_numpy(batch["input_ids"]),
            "attention_mask": torch.from_numpy(batch["attention_mask"]),
            "position_ids": reference_position_ids(model, batch, position_mode)}
  if "pixel_values" in batch:
    kwargs["pixel_values"] = torch.from_numpy(batch["pixel_values"]).to(dtype)
    kwargs["image_grid_thw"] = torch.from_numpy(batch["image_grid_thw"])
  hidden = model.model(**kwargs).last_hidden_state
  return {"hidden_states": hidden.float().numpy(), "logits": model.lm_head(hidden).float().numpy()}
