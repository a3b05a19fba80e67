"""The HF checkpoint loader and writer: layouts, key names, errors, loading onto a mesh, round trips."""

import json
import os
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image
from transformers import AutoImageProcessor, Qwen2_5_VLForConditionalGeneration

from recall_jax import parallel
from recall_jax.data.image import preprocess_images
from recall_jax.models.qwen2_5_vl import Qwen25VLModel, from_pretrained, save_pretrained, tiny_config
from recall_jax.models.qwen2_5_vl.params import SafetensorsFile, write_safetensors
from tests.models.qwen2_5_vl import reference as ref

SMALL = dict(text=dict(num_hidden_layers=1), vision=dict(depth=2, fullatt_block_indexes=(1,)))
ROWS = [[3, (1, 8, 8), 2], [1, (1, 4, 8), 4]]


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
  return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a: nnx.Module, b: nnx.Module):
  pa, pb = flat_params(a), flat_params(b)
  assert pa.keys() == pb.keys()
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def read_all(directory: str) -> dict[str, np.ndarray]:
  st = SafetensorsFile(os.path.join(directory, "model.safetensors"))
  return {k: st.read(k) for k in st.keys()}


def rewrite(src: str, dst: str, tensors: dict[str, np.ndarray]) -> str:
  """A copy of checkpoint `src` in `dst` with model.safetensors replaced by `tensors`."""
  os.makedirs(dst, exist_ok=True)
  shutil.copy(os.path.join(src, "config.json"), dst)
  write_safetensors(os.path.join(dst, "model.safetensors"), tensors)
  return dst


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
  cfg = tiny_config(**SMALL)
  directory = str(tmp_path_factory.mktemp("untied"))
  hf = ref.save_reference(cfg, directory)
  return cfg, directory, hf, from_pretrained(directory)


def test_hub_key_names_on_disk_and_tied_checkpoint_without_lm_head(tmp_path):
  cfg = tiny_config(tie_word_embeddings=True, **SMALL)
  ref.save_reference(cfg, str(tmp_path))
  keys = set(read_all(str(tmp_path)))
  assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys and "visual.merger.ln_q.weight" in keys
  model = from_pretrained(str(tmp_path))
  assert not hasattr(model, "lm_head")
  np.testing.assert_array_equal(np.asarray(model.language_model.embed_tokens.embedding.get_value()),
                                read_all(str(tmp_path))["model.embed_tokens.weight"])


def test_flat_hub_config_layout_loads_the_same(untied, tmp_path):
  cfg, directory, _, model = untied
  with open(os.path.join(directory, "config.json")) as f:
    nested = json.load(f)
  text = nested.pop("text_config")
  rope = text.pop("rope_parameters")
  flat = {**nested, **text, "rope_theta": rope["rope_theta"],
          "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}
  shutil.copy(os.path.join(directory, "model.safetensors"), tmp_path)
  with open(tmp_path / "config.json", "w") as f:
    json.dump(flat, f)
  flat_model = from_pretrained(str(tmp_path))
  assert flat_model.cfg == model.cfg
  assert_same_params(flat_model, model)


def test_sharded_checkpoint_with_index(untied, tmp_path):
  _, directory, _, model = untied
  tensors = read_all(directory)
  keys = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
  shutil.copy(os.path.join(directory, "config.json"), tmp_path)
  for name, shard_keys in shards.items():
    write_safetensors(str(tmp_path / name), {k: tensors[k] for k in shard_keys})
  weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
  with open(tmp_path / "model.safetensors.index.json", "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  assert_same_params(from_pretrained(str(tmp_path)), model)
  os.remove(tmp_path / "model-00002-of-00002.safetensors")
  with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors: listed in .*index.json"):
    from_pretrained(str(tmp_path))


def test_transformers_in_memory_key_names(untied, tmp_path):
  _, directory, hf, model = untied
  tensors = dict(hf.state_dict())  # model.language_model.*, model.visual.*, lm_head.weight
  assert any(k.startswith("model.language_model.") for k in tensors)
  rewrite(directory, str(tmp_path), {k: v.numpy() for k, v in tensors.items()})
  assert_same_params(from_pretrained(str(tmp_path)), model)


def test_bf16_checkpoint_loads_as_float32(untied, tmp_path):
  _, directory, _, model = untied
  tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in read_all(directory).items()}
  loaded = from_pretrained(rewrite(directory, str(tmp_path), tensors))
  for k, v in flat_params(loaded).items():
    assert v.dtype == np.float32
    np.testing.assert_allclose(v, flat_params(model)[k], rtol=1e-2, atol=1e-6, err_msg=k)


def test_errors_name_the_file_and_key(untied, tmp_path):
  _, directory, _, _ = untied
  tensors = read_all(directory)
  with pytest.raises(FileNotFoundError, match="no config.json"):
    from_pretrained(str(tmp_path))
  shutil.copy(os.path.join(directory, "config.json"), tmp_path)
  with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
    from_pretrained(str(tmp_path))

  missing = {k: v for k, v in tensors.items() if k != "model.layers.0.mlp.up_proj.weight"}
  with pytest.raises(KeyError, match="missing keys \\['model.layers.0.mlp.up_proj.weight'\\]"):
    from_pretrained(rewrite(directory, str(tmp_path / "missing"), missing))

  extra = {**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(4, np.float32)}
  with pytest.raises(KeyError, match="safetensors: unexpected key 'model.layers.0.self_attn.rotary_emb.inv_freq'"):
    from_pretrained(rewrite(directory, str(tmp_path / "extra"), extra))
  extra_layer = {**tensors, "model.layers.5.input_layernorm.weight": np.ones(64, np.float32)}
  with pytest.raises(KeyError, match="unexpected key 'model.layers.5.input_layernorm.weight'"):
    from_pretrained(rewrite(directory, str(tmp_path / "extra_layer"), extra_layer))

  wrong = {**tensors, "model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}
  with pytest.raises(ValueError, match="key 'model.layers.0.self_attn.k_proj.weight' has shape \\(64, 64\\), "
                     "model expects \\(32, 64\\)"):
    from_pretrained(rewrite(directory, str(tmp_path / "wrong"), wrong))

  with pytest.raises(ValueError, match="shardings given without a mesh"):
    from_pretrained(directory, shardings=[(".*", ())])


def test_damaged_checkpoints_name_the_file_and_the_field(untied, tmp_path):
  _, directory, _, _ = untied
  data = open(os.path.join(directory, "model.safetensors"), "rb").read()

  def damaged(name, blob):
    d = tmp_path / name
    d.mkdir()
    shutil.copy(os.path.join(directory, "config.json"), d)
    (d / "model.safetensors").write_bytes(blob)
    return str(d)

  truncated = damaged("truncated", data[:len(data) // 2])
  with pytest.raises(ValueError, match=rf"{truncated}/model.safetensors: not a readable safetensors file"):
    from_pretrained(truncated)
  lfs = damaged("lfs", b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 99999999\n")
  with pytest.raises(ValueError, match=rf"{lfs}/model.safetensors: a git-lfs pointer, not the weights"):
    from_pretrained(lfs)
  size = int.from_bytes(data[:8], "little")
  header = json.loads(data[8:8 + size])
  key = next(k for k in header if k != "__metadata__")
  start, end = header[key]["data_offsets"]
  header[key]["data_offsets"] = [start, end - 4]  # offsets at odds with the shape
  blob = json.dumps(header).encode()
  blob += b" " * (-len(blob) % 8)
  offsets = damaged("offsets", len(blob).to_bytes(8, "little") + blob + data[8 + size:])
  with pytest.raises(ValueError, match=rf"{offsets}/model.safetensors: not a readable safetensors file"):
    from_pretrained(offsets)

  config = json.load(open(os.path.join(directory, "config.json")))
  del config["vision_config"]["depth"]
  no_depth = damaged("no_depth", data)
  with open(os.path.join(no_depth, "config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match=rf"{no_depth}/config.json: missing vision_config key 'depth'"):
    from_pretrained(no_depth)


def test_loading_onto_a_mesh_gives_the_sharding_and_the_same_outputs(untied):
  cfg, directory, _, model = untied
  mesh = parallel.make_mesh((2, 4, 1))
  rules = [(r"embed_tokens/embedding", ("fsdp", None)), (r"q_proj/kernel", (None, "fsdp")),
           (r"mlp/(gate|up)_proj/kernel", (None, "fsdp"))]
  sharded = from_pretrained(directory, mesh=mesh, shardings=rules)
  attn = sharded.language_model.layers[0].self_attn
  assert sharded.language_model.embed_tokens.embedding.get_value().sharding == NamedSharding(mesh, P("fsdp", None))
  assert attn.q_proj.kernel.get_value().sharding == NamedSharding(mesh, P(None, "fsdp"))
  assert attn.k_proj.kernel.get_value().sharding == NamedSharding(mesh, P())
  assert len(attn.q_proj.kernel.get_value().addressable_shards) == 8
  by_callable = from_pretrained(directory, mesh=mesh, shardings=lambda path: P("data") if "lm_head" in path else P())
  assert by_callable.lm_head.kernel.get_value().sharding == NamedSharding(mesh, P("data"))
  assert_same_params(sharded, model)

  batch = ref.make_batch(cfg, ROWS)
  want = model(**batch)
  got = sharded(**batch)
  # Sharded matmuls sum in another order: equal up to fp32 noise, relative to each output's scale.
  for name in ("logits", "hidden_states"):
    w = np.asarray(getattr(want, name))
    np.testing.assert_allclose(np.asarray(getattr(got, name)), w, rtol=0, atol=1e-5 * np.abs(w).max(), err_msg=name)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_save_pretrained_is_read_by_transformers_and_by_from_pretrained(tmp_path, tie):
  cfg = tiny_config(tie_word_embeddings=tie, **SMALL)
  model = Qwen25VLModel(cfg, rngs=nnx.Rngs(3))
  save_pretrained(model, str(tmp_path))
  assert_same_params(from_pretrained(str(tmp_path)), model)
  hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  batch = ref.make_batch(cfg, ROWS, seed=4)
  want = ref.reference_forward(hf, batch)
  got = model(**batch)
  mask = batch["attention_mask"].astype(bool)
  for k in ("hidden_states", "logits"):
    diff = np.abs(np.asarray(getattr(got, k))[mask] - want[k][mask]).max()
    assert diff <= 1e-4 * np.abs(want[k][mask]).max(), (k, diff)


def test_save_pretrained_keeps_bf16(untied, tmp_path):
  _, directory, _, _ = untied
  model = from_pretrained(directory, dtype=jnp.bfloat16)
  save_pretrained(model, str(tmp_path))
  st = SafetensorsFile(str(tmp_path / "model.safetensors"))
  assert {st.read(k).dtype for k in st.keys()} == {np.dtype(ml_dtypes.bfloat16)}
  assert st.read("visual.patch_embed.proj.weight").shape == (32, 3, 2, 14, 14)
  assert_same_params(from_pretrained(str(tmp_path), dtype=jnp.bfloat16), model)


def test_save_pretrained_preprocessor_config_gives_our_pixels_in_transformers(tmp_path):
  cfg = tiny_config(**SMALL)
  save_pretrained(Qwen25VLModel(cfg, rngs=nnx.Rngs(0)), str(tmp_path))
  processor = AutoImageProcessor.from_pretrained(str(tmp_path))
  assert type(processor).__name__.startswith("Qwen2VLImageProcessor")
  # 90 x 130 is smart-resized (to 84 x 140); the alpha channel is composited on white.
  rgba = np.random.default_rng(0).integers(0, 256, (90, 130, 4), dtype=np.uint8)
  image = Image.fromarray(rgba)
  want_pixels, want_grid = preprocess_images([image])
  got = processor(images=[image], return_tensors="np")
  np.testing.assert_array_equal(got["image_grid_thw"], want_grid)
  assert want_grid.tolist() == [[1, 6, 10]]
  np.testing.assert_array_equal(got["pixel_values"], want_pixels)
  # The bounds are areas: a large image is scaled under max_pixels the same way by both.
  big = Image.fromarray(rgba[..., :3]).resize((900, 650))
  np.testing.assert_array_equal(processor(images=[big], return_tensors="np")["pixel_values"],
                                preprocess_images([big])[0])
