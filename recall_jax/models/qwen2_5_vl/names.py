"""The one map between Hugging Face names and NNX module paths for Qwen2.5-VL, for checkpoints and PEFT adapters.

NNX module paths (`language_model.*`, `visual.*`, `lm_head`) mirror the HF names, in two layouts:
  hub:          the checkpoint keys that transformers' save_pretrained writes and the hub holds
                (`model.layers.*`, `model.embed_tokens`, `model.norm`, `visual.*`, `lm_head`);
  transformers: the transformers-5 module names of Qwen2_5_VLForConditionalGeneration in memory
                (`model.language_model.*`, `model.visual.*`, `lm_head`), which peft names its adapters by.
`nnx_path` reads either layout.
"""

from __future__ import annotations

from recall_jax.models.peft_io import PeftNames

HUB = "hub"
TRANSFORMERS = "transformers"
SAVE_LAYOUT = HUB  # what transformers' save_pretrained writes for Qwen2.5-VL (its conversion mapping)

# HF prefix -> NNX prefix; first match wins (transformers-5 names before the hub's bare "model.").
_FROM_HF = (
    ("model.language_model.", "language_model."),
    ("model.visual.", "visual."),
    ("model.", "language_model."),
    ("visual.", "visual."),
    ("lm_head.", "lm_head."),
)
# Layout -> NNX prefix -> HF prefix.
_TO_HF = {
    HUB: (("language_model.", "model."), ("visual.", "visual."), ("lm_head.", "lm_head.")),
    TRANSFORMERS: (("language_model.", "model.language_model."), ("visual.", "model.visual."),
                   ("lm_head.", "lm_head.")),
}

# The effective ReCALL LoRA target set: LLM q/k/v/o and down projections + the vision MLP down projection.
LORA_TARGET_REGEX = (
    r"language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.down_proj)"
    r"|visual\.blocks\.\d+\.mlp\.down_proj")


def _swap_prefix(name: str, table) -> str | None:
  dotted = name + "."  # so that a root module name ("lm_head") matches its prefix too
  for old, new in table:
    if dotted.startswith(old):
      return (new + dotted[len(old):])[:-1]
  return None


def nnx_path(hf_name: str) -> str | None:
  """The dotted NNX path of an HF key or module name in either layout; None when it is no Qwen2.5-VL name."""
  return _swap_prefix(hf_name, _FROM_HF)


def hf_name(path: str, layout: str = HUB) -> str:
  """The HF name, in `layout` ("hub" or "transformers"), of a dotted NNX module or parameter path."""
  if layout not in _TO_HF:
    raise ValueError(f"unknown Hugging Face name layout {layout!r}; expected one of {sorted(_TO_HF)}")
  name = _swap_prefix(path, _TO_HF[layout])
  if name is None:
    raise ValueError(f"no Hugging Face name for Qwen2.5-VL module path {path!r}")
  return name


def _peft_from_hf(name: str) -> str:
  path = nnx_path(name)
  if path is None:
    raise ValueError(f"unknown Qwen2.5-VL module name {name!r} in a peft adapter")
  return path


# What peft 0.21 + transformers 5 call the modules (adapters saved with older transformers, in the hub layout,
# read the same).
PEFT_NAMES = PeftNames(to_hf=lambda path: hf_name(path, TRANSFORMERS), from_hf=_peft_from_hf)
