"""The one Qwen2.5-VL name map: hub checkpoint keys, transformers-5 module names and peft adapter keys <-> NNX paths."""

import re

import peft
import pytest
import safetensors
from flax import nnx

from recall_jax.models.qwen2_5_vl import Qwen25VLModel, names, tiny_config
from recall_jax.models.qwen2_5_vl.params import param_path_to_hf_key
from tests.models.qwen2_5_vl import reference as ref

SMALL = dict(text=dict(num_hidden_layers=2), vision=dict(depth=2, fullatt_block_indexes=(1,)))


def test_both_layouts_name_every_parameter_as_transformers_does(tmp_path):
  cfg = tiny_config(**SMALL)
  hf = ref.save_reference(cfg, str(tmp_path))
  in_memory = {n for n, _ in hf.named_parameters()}
  with safetensors.safe_open(str(tmp_path / "model.safetensors"), "np") as f:
    on_disk = set(f.keys())
  model = nnx.eval_shape(lambda: Qwen25VLModel(cfg, rngs=nnx.Rngs(0)))
  hub = {param_path_to_hf_key(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert hub == on_disk
  assert {names.hf_name(names.nnx_path(k), names.TRANSFORMERS) for k in hub} == in_memory
  # Either layout reads back to the same NNX path.
  for key in hub:
    path = names.nnx_path(key)
    assert names.nnx_path(names.hf_name(path, names.TRANSFORMERS)) == names.nnx_path(names.hf_name(path)) == path
  assert names.nnx_path("lm_head") == "lm_head" and names.nnx_path("multi_modal_projector.x") is None


def test_peft_names_and_lora_targets_on_hf_qwen2_5_vl(tmp_path):
  """The key names peft 0.21 + transformers 5 write for Qwen2_5_VLForConditionalGeneration map to NNX paths, and
  ReCALL's suffix targets select exactly LORA_TARGET_REGEX (vision attention uses qkv/proj)."""
  hf = ref.build_reference(tiny_config(**SMALL))
  pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=[
      "q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]))
  pm.save_pretrained(str(tmp_path))
  with safetensors.safe_open(str(tmp_path / "adapter_model.safetensors"), "np") as f:
    keys = list(f.keys())
  modules = {k[len("base_model.model."):k.index(".lora_")] for k in keys}
  paths = {names.PEFT_NAMES.from_hf(n) for n in modules}
  expected = {f"language_model.layers.{i}.{m}" for i in range(2) for m in (
      "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")}
  expected |= {f"visual.blocks.{i}.mlp.down_proj" for i in range(2)}
  assert paths == expected
  linears = {".".join(map(str, p)) for p, m in nnx.iter_modules(Qwen25VLModel(tiny_config(**SMALL),
                                                                              rngs=nnx.Rngs(0)))
             if type(m) is nnx.Linear}
  assert {p for p in linears if re.fullmatch(names.LORA_TARGET_REGEX, p)} == expected
  assert {names.PEFT_NAMES.to_hf(p) for p in paths} == modules
  # Adapters saved with older transformers (hub layout: model.layers.*, visual.*) resolve to the same paths.
  assert names.PEFT_NAMES.from_hf("model.layers.0.mlp.down_proj") == "language_model.layers.0.mlp.down_proj"
  assert names.PEFT_NAMES.from_hf("visual.blocks.1.mlp.down_proj") == "visual.blocks.1.mlp.down_proj"


def test_unknown_names_raise_naming_them():
  with pytest.raises(ValueError, match="'multi_modal_projector.x' in a peft adapter"):
    names.PEFT_NAMES.from_hf("multi_modal_projector.x")
  with pytest.raises(ValueError, match="no Hugging Face name for Qwen2.5-VL module path 'encoder.x'"):
    names.hf_name("encoder.x")
  with pytest.raises(ValueError, match="unknown Hugging Face name layout 'torch'"):
    names.hf_name("lm_head", "torch")
