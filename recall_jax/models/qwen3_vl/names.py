"""The one map between Hugging Face names and NNX module paths for Qwen3-VL, for checkpoints and PEFT adapters.

NNX module paths (`language_model.*`, `visual.*`, `lm_head`) mirror transformers' Qwen3VLForConditionalGeneration.
transformers (5.23) has no conversion mapping for Qwen3-VL: its checkpoints, the hub's included, and the module
names peft adapters are keyed by are the same layout (`model.language_model.*`, `model.visual.*`, `lm_head`). The
bare `model.*` / `visual.*` layout of older Qwen-VL exports is read too.
"""

from __future__ import annotations

from recall_jax.models.peft_io import PeftNames
from recall_jax.models.qwen2_5_vl.names import _swap_prefix

TRANSFORMERS = "transformers"
SAVE_LAYOUT = TRANSFORMERS

_FROM_HF = (
    ("model.language_model.", "language_model."),
    ("model.visual.", "visual."),
    ("model.", "language_model."),
    ("visual.", "visual."),
    ("lm_head.", "lm_head."),
)
_TO_HF = {TRANSFORMERS: (("language_model.", "model.language_model."), ("visual.", "model.visual."),
                         ("lm_head.", "lm_head."))}

# The effective ReCALL LoRA set mapped to Qwen3-VL: LLM q/k/v/o and down projections + the vision MLP's down
# projection (Qwen3-VL's vision MLP is linear_fc1 -> GELU -> linear_fc2, so its "down" is linear_fc2).
LORA_TARGET_REGEX = (
    r"language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.down_proj)"
    r"|visual\.blocks\.\d+\.mlp\.linear_fc2")


def nnx_path(hf_name: str) -> str | None:
  """The dotted NNX path of an HF key or module name; None when it is no Qwen3-VL name."""
  return _swap_prefix(hf_name, _FROM_HF)


def hf_name(path: str, layout: str = TRANSFORMERS) -> str:
  """The HF name of a dotted NNX module or parameter path (one layout: "transformers")."""
  if layout not in _TO_HF:
    raise ValueError(f"unknown Qwen3-VL name layout {layout!r}; expected one of {sorted(_TO_HF)}")
  name = _swap_prefix(path, _TO_HF[layout])
  if name is None:
    raise ValueError(f"no Hugging Face name for Qwen3-VL module path {path!r}")
  return name


def _peft_from_hf(name: str) -> str:
  path = nnx_path(name)
  if path is None:
    raise ValueError(f"unknown Qwen3-VL module name {name!r} in a peft adapter")
  return path


PEFT_NAMES = PeftNames(to_hf=hf_name, from_hf=_peft_from_hf)
