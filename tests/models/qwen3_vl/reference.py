"""The PyTorch reference for the Qwen3-VL tests: tiny random transformers models and their checkpoints.

Inputs come from the Qwen2.5-VL reference's `make_batch` (the layout of the HF processor is the same); positions are
always passed explicitly from transformers' own get_rope_index (see tests/models/qwen2_5_vl/reference.py).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from transformers import Qwen3VLConfig as HFQwen3VLConfig
from transformers import Qwen3VLForConditionalGeneration

from recall_jax.models.qwen3_vl.config import Qwen3VLConfig
from tests.models.qwen2_5_vl.reference import PAD_TOKEN_ID, make_batch  # noqa: F401  (re-exported)


def hf_config(cfg: Qwen3VLConfig) -> HFQwen3VLConfig:
  d = cfg.to_hf_dict()
  d["text_config"].update(bos_token_id=PAD_TOKEN_ID, eos_token_id=PAD_TOKEN_ID, pad_token_id=PAD_TOKEN_ID)
  return HFQwen3VLConfig.from_dict(d)


def build_reference(cfg: Qwen3VLConfig, seed: int = 0) -> Qwen3VLForConditionalGeneration:
  """A random fp32 transformers model; norm scales and biases are perturbed too (HF inits them to 1 / 0), and the
  position table gets a visible scale, so the tests see every parameter."""
  torch.manual_seed(seed)
  model = Qwen3VLForConditionalGeneration(hf_config(cfg)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
      if "pos_embed" in name:
        p.normal_(0.0, 1.0)
  return model


def save_reference(cfg: Qwen3VLConfig, directory: str, seed: int = 0, **save_kwargs) -> Qwen3VLForConditionalGeneration:
  model = build_reference(cfg, seed)
  model.save_pretrained(directory, **save_kwargs)
  assert any(f.startswith("model") and f.endswith((".safetensors", ".json")) for f in os.listdir(directory))
  return model


def reference_position_ids(model: Qwen3VLForConditionalGeneration, batch: dict[str, np.ndarray]) -> torch.Tensor:
  ids = torch.from_numpy(batch["input_ids"])
  grid = batch.get("image_grid_thw")
  position_ids, _ = model.model.get_rope_index(
      ids, mm_token_type_ids=(ids == model.config.image_token_id).int(),
      image_grid_thw=None if grid is None else torch.from_numpy(grid),
      attention_mask=torch.from_numpy(batch["attention_mask"]))
  return position_ids


@torch.no_grad()
def reference_forward(model: Qwen3VLForConditionalGeneration, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Final hidden states (after the norm) and logits, as fp32 numpy."""
  model.model.rope_deltas = None
  dtype = next(model.parameters()).dtype
  kwargs = {"input_ids": torch.from_numpy(batch["input_ids"]),
            "attention_mask": torch.from_numpy(batch["attention_mask"]),
            "position_ids": reference_position_ids(model, batch)}
  if "pixel_values" in batch:
    kwargs["pixel_values"] = torch.from_numpy(batch["pixel_values"]).to(dtype)
    kwargs["image_grid_thw"] = torch.from_numpy(batch["image_grid_thw"])
  hidden = model.model(**kwargs).last_hidden_state
  return {"hidden_states": hidden.float().numpy(), "logits": model.lm_head(hidden).float().numpy()}


@torch.no_grad()
def reference_vision(model: Qwen3VLForConditionalGeneration, batch: dict[str, np.ndarray]):
  """(merged tokens, [DeepStack features]) of the vision tower, fp32 numpy."""
  out = model.model.visual(torch.from_numpy(batch["pixel_values"]), grid_thw=torch.from_numpy(batch["image_grid_thw"]))
  return out.pooler_output.float().numpy(), [f.float().numpy() for f in out.deepstack_features]
