"""PEFT adapter files: export read by peft (torch), peft-saved adapters imported, on a small model and on the tiny
Qwen2.5-VL (through its name map)."""

import json

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors
from flax import nnx

from recall_jax.models import lora, peft_io
from recall_jax.models.qwen2_5_vl import from_pretrained, tiny_config
from recall_jax.models.qwen2_5_vl import names as qwen_names
from tests.models.qwen2_5_vl import reference as ref
from tests.models.test_lora import (LAYERS, TARGETS, _nnx_from_torch, _peft_model, _randomize_nnx, _randomize_peft,
                                    _torch_model, _torch_out, _x)


@pytest.mark.parametrize("use_dora", [False, True])
def test_export_then_peft_load(tmp_path, use_dora):
  tm = _torch_model()
  model = _nnx_from_torch(tm)
  lora.apply_lora(model, TARGETS, rank=4, alpha=12, dropout=0.1, use_dora=use_dora, rngs=nnx.Rngs(2))
  _randomize_nnx(model)
  model.eval()
  peft_io.export_peft(model, str(tmp_path), base_model_name_or_path="tiny", names=peft_io.IDENTITY_NAMES)
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["use_dora"]) == (4, 12, 0.1, use_dora)
  assert config["base_model_name_or_path"] == "tiny"
  pm = peft.PeftModel.from_pretrained(_torch_model(), str(tmp_path)).eval()
  assert sum("lora_A" in n for n, _ in pm.named_parameters()) == 5 * LAYERS
  x = _x(3)
  np.testing.assert_allclose(model(jnp.asarray(x)), _torch_out(pm, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_saved_then_import(tmp_path, use_dora):
  tm = _torch_model()
  pm = _randomize_peft(_peft_model(tm, use_dora, rank=2, alpha=5), seed=4)
  pm.save_pretrained(str(tmp_path))
  model = _nnx_from_torch(_torch_model())
  paths = peft_io.import_peft(model, str(tmp_path), names=peft_io.IDENTITY_NAMES)
  assert len(paths) == 5 * LAYERS
  m = lora.lora_modules(model)["layers.0.self_attn.q_proj"]
  assert (m.rank, m.scaling, m.use_dora) == (2, 2.5, use_dora)
  x = _x(5)
  np.testing.assert_allclose(model(jnp.asarray(x)), _torch_out(pm, x), atol=1e-5, rtol=1e-5)


def test_import_suffix_targets_and_errors(tmp_path):
  # ReCALL's configs list suffixes ("q_proj", ..., "down_proj"); peft matches them as dotted suffixes.
  tm = _torch_model()
  cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], use_dora=True)
  pm = _randomize_peft(peft.get_peft_model(tm, cfg))
  pm.save_pretrained(str(tmp_path))
  model = _nnx_from_torch(_torch_model())
  assert peft_io.import_peft(model, str(tmp_path), names=peft_io.IDENTITY_NAMES) == [
      f"layers.{i}.{m}" for i in range(LAYERS) for m in ("mlp.down_proj", "self_attn.q_proj")]
  x = _x(6)
  np.testing.assert_allclose(model(jnp.asarray(x)), _torch_out(pm, x), atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="already has LoRA adapters"):
    peft_io.import_peft(model, str(tmp_path), names=peft_io.IDENTITY_NAMES)

  config = json.loads((tmp_path / "adapter_config.json").read_text())
  config["use_rslora"] = True
  (tmp_path / "adapter_config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="use_rslora"):
    peft_io.import_peft(_nnx_from_torch(_torch_model()), str(tmp_path), names=peft_io.IDENTITY_NAMES)
  config["use_rslora"] = False
  config["target_modules"] = ["q_proj", "k_proj", "down_proj"]  # k_proj weights are not in the file.
  (tmp_path / "adapter_config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"missing lora_a for module 'layers.0.self_attn.k_proj'"):
    peft_io.import_peft(_nnx_from_torch(_torch_model()), str(tmp_path), names=peft_io.IDENTITY_NAMES)
  with pytest.raises(FileNotFoundError, match="adapter_config.json"):
    peft_io.import_peft(_nnx_from_torch(_torch_model()), str(tmp_path / "nope"), names=peft_io.IDENTITY_NAMES)


def test_qwen2_5_vl_peft_import_export_and_merge(tmp_path):
  """On the tiny Qwen2.5-VL: peft-trained DoRA adapters -> import -> same hidden states as transformers + peft;
  export -> peft loads the same keys and gives the same outputs; merged weights give the same outputs."""
  cfg = tiny_config()
  base_dir = str(tmp_path / "base")
  hf = ref.save_reference(cfg, base_dir)
  pm = _randomize_peft(peft.get_peft_model(hf, peft.LoraConfig(
      r=4, lora_alpha=16, use_dora=True, init_lora_weights="gaussian",
      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])), seed=3)
  pm.save_pretrained(str(tmp_path / "peft"))

  model = from_pretrained(base_dir)
  paths = peft_io.import_peft(model, str(tmp_path / "peft"), names=qwen_names.PEFT_NAMES)
  assert paths == lora.apply_lora(from_pretrained(base_dir), qwen_names.LORA_TARGET_REGEX, rank=2, alpha=2,
                                  rngs=nnx.Rngs(0))
  assert len(paths) == 5 * cfg.text.num_hidden_layers + cfg.vision.depth

  batch = ref.make_batch(cfg, [[3, (1, 8, 8), 2], [4, (1, 4, 8), 5]])
  mask = batch["attention_mask"].astype(bool)
  want = ref.reference_forward(hf, batch)["hidden_states"][mask]
  got = np.asarray(model(**batch).hidden_states)[mask]
  scale = np.abs(want).max()
  with pm.disable_adapter():
    base = ref.reference_forward(hf, batch)["hidden_states"][mask]
  assert np.abs(base - want).max() > 1e-2 * scale  # the adapters really change the output
  np.testing.assert_allclose(got / scale, want / scale, atol=1e-5)

  assert model.name_or_path == base_dir  # from_pretrained records where the base came from
  peft_io.export_peft(model, str(tmp_path / "out"), names=qwen_names.PEFT_NAMES,
                      base_model_name_or_path=model.name_or_path)
  assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"] == base_dir
  key_sets = []
  for d in ("peft", "out"):
    with safetensors.safe_open(str(tmp_path / d / "adapter_model.safetensors"), "np") as f:
      key_sets.append(set(f.keys()))
  assert key_sets[0] == key_sets[1]
  hf2 = ref.build_reference(cfg)
  peft.PeftModel.from_pretrained(hf2, str(tmp_path / "out"))
  np.testing.assert_allclose(ref.reference_forward(hf2, batch)["hidden_states"][mask] / scale, got / scale,
                             atol=1e-5)

  lora.merge_lora(model)
  np.testing.assert_allclose(np.asarray(model(**batch).hidden_states)[mask] / scale, got / scale, atol=1e-5)
