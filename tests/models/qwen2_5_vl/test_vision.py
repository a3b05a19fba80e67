"""Parity of the NNX Qwen2.5-VL vision tower with transformers' Qwen2_5_VisionTransformerPretrainedModel."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import vision_utils
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from recall_jax.models.qwen2_5_vl.config import VisionConfig
from recall_jax.models.qwen2_5_vl.vision import VisionTransformer
from recall_jax.models.qwen2_5_vl.vision_geometry import rotary_position_ids, vision_geometry, window_index

# Window 56 px = 2x2 merged units = 4x4 patches, so these grids have several windows, ragged ones included.
CFG = VisionConfig(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48, patch_size=14,
                   window_size=56, fullatt_block_indexes=(1, 3))
ONE_IMAGE = np.array([[1, 10, 14]])  # merged 5x7: 3x4 windows, last row / column ragged
MIXED = np.array([[1, 8, 12], [1, 10, 6], [2, 4, 6]])  # a 2-frame entry exercises per-frame segments


def _hf_model() -> Qwen2_5_VisionTransformerPretrainedModel:
  hf_cfg = Qwen2_5_VLVisionConfig(depth=CFG.depth, hidden_size=CFG.hidden_size, num_heads=CFG.num_heads,
                                  intermediate_size=CFG.intermediate_size, out_hidden_size=CFG.out_hidden_size,
                                  patch_size=CFG.patch_size, window_size=CFG.window_size,
                                  fullatt_block_indexes=list(CFG.fullatt_block_indexes))
  torch.manual_seed(0)
  model = Qwen2_5_VisionTransformerPretrainedModel._from_config(hf_cfg).eval()
  # Re-draw every parameter at unit scale (the init leaves norms at one and biases at zero, which would hide
  # mapping mistakes, and its 0.02 std makes the tiny tower nearly linear).
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim > 1:
        p.copy_(torch.randn_like(p) * (p[0].numel() ** -0.5))
      elif "norm" in name or "ln_q" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
  return model


def _hf_key(path: tuple) -> str:
  """NNX param path -> HF state_dict key (the name map documented in vision.py)."""
  *prefix, leaf = (str(p) for p in path)
  return ".".join(prefix + ["weight" if leaf in ("kernel", "weight") else leaf])


def _load_hf(model: VisionTransformer, state_dict: dict[str, torch.Tensor]) -> None:
  state = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  assert {_hf_key(p) for p in flat} == set(state_dict), "param names do not map one-to-one onto HF keys"
  for path, var in flat.items():
    w = state_dict[_hf_key(path)].float().numpy()
    if path[-1] == "kernel":
      w = w.reshape(w.shape[0], -1).T  # torch (out, in[, ...]) -> (in, out); conv3d flattened
    assert w.shape == var.shape, (path, w.shape, var.shape)
    var.set_value(jnp.asarray(w, dtype=var.dtype))
  nnx.update(model, state)


@pytest.fixture(scope="module")
def hf_model():
  return _hf_model()


def _nnx_model(hf_model, dtype=jnp.float32) -> VisionTransformer:
  # Abstract init (no random draws): every param is overwritten by the HF weights anyway.
  model = nnx.eval_shape(lambda: VisionTransformer(CFG, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
  _load_hf(model, hf_model.state_dict())
  return model


def _pixels(grids: np.ndarray, seed: int) -> np.ndarray:
  n = int(np.prod(grids, axis=-1).sum())
  return np.random.default_rng(seed).standard_normal((n, CFG.patch_dim)).astype(np.float32)


def _hf_forward(hf_model, pixels: np.ndarray, grids: np.ndarray) -> np.ndarray:
  dtype = next(hf_model.parameters()).dtype
  with torch.no_grad():
    out = hf_model(torch.from_numpy(pixels).to(dtype), grid_thw=torch.from_numpy(grids)).pooler_output
  return out.float().numpy()


_jitted_call = nnx.jit(VisionTransformer.__call__)


def _forward(model: VisionTransformer, pixels: np.ndarray, grids: np.ndarray) -> np.ndarray:
  geometry = {k: jnp.asarray(v) for k, v in vision_geometry(grids, CFG).items()}
  return np.asarray(_jitted_call(model, jnp.asarray(pixels), geometry).astype(jnp.float32))


def _rel_err(x: np.ndarray, ref: np.ndarray) -> float:
  return float(np.abs(x - ref).max() / np.abs(ref).max())


def test_geometry_matches_transformers():
  for grids in (ONE_IMAGE, MIXED):
    t_grids = torch.from_numpy(grids)
    ref_index, ref_cu = vision_utils.get_vision_window_index(t_grids, CFG.spatial_merge_size, CFG.window_size,
                                                             CFG.patch_size)
    index, cu = window_index(grids, CFG)
    np.testing.assert_array_equal(index, ref_index.numpy())
    np.testing.assert_array_equal(cu, ref_cu.numpy())
    ref_pos = vision_utils.get_vision_position_ids(t_grids, CFG.spatial_merge_size)
    np.testing.assert_array_equal(rotary_position_ids(grids, CFG), ref_pos.numpy())
  geometry = vision_geometry(ONE_IMAGE, CFG)
  # 3x4 windows of at most 4x4 patches: 6 full, 3 (last column) 4x2, 2 (last row) 2x4, 1 corner 2x2.
  assert sorted(geometry["window_lengths"].tolist()) == [4, 8, 8, 8, 8, 8] + [16] * 6
  assert geometry["window_gather"].shape == (12, 16)
  n = 140
  flat = geometry["window_gather"].reshape(-1)[geometry["window_scatter"]]
  np.testing.assert_array_equal(flat, np.arange(n))  # every token read back from its own slot
  np.testing.assert_array_equal(geometry["full_gather"].reshape(-1)[geometry["full_scatter"]], np.arange(n))


def test_one_image_ragged_windows_fp32(hf_model):
  pixels = _pixels(ONE_IMAGE, 0)
  ref = _hf_forward(hf_model, pixels, ONE_IMAGE)
  out = _forward(_nnx_model(hf_model), pixels, ONE_IMAGE)
  assert out.shape == (35, CFG.out_hidden_size)
  assert _rel_err(out, ref) <= 1e-4


def test_mixed_grids_fp32(hf_model):
  pixels = _pixels(MIXED, 1)
  ref = _hf_forward(hf_model, pixels, MIXED)
  out = _forward(_nnx_model(hf_model), pixels, MIXED)
  assert out.shape == ((96 + 60 + 48) // 4, CFG.out_hidden_size)
  assert _rel_err(out, ref) <= 1e-4
  # Each image's tokens depend only on that image: the first image alone gives its rows of the batch output.
  alone = _forward(_nnx_model(hf_model), pixels[:96], MIXED[:1])
  np.testing.assert_allclose(alone, out[:24], rtol=0, atol=1e-5 * np.abs(out).max())


def test_bf16_close_to_fp32_reference(hf_model):
  pixels = _pixels(MIXED, 2)
  ref = _hf_forward(hf_model, pixels, MIXED)
  out = _forward(_nnx_model(hf_model, jnp.bfloat16), pixels, MIXED)
  hf_bf16 = _hf_forward(_hf_model().to(torch.bfloat16), pixels, MIXED)
  err, hf_err = _rel_err(out, ref), _rel_err(hf_bf16, ref)
  # bf16 has ~3 significant digits; our bf16 error should be of the order of transformers' own bf16 error.
  assert err <= 3e-2, (err, hf_err)
  assert err <= 1.5 * hf_err + 5e-3, (err, hf_err)


def test_jit_compiles_once_per_grid_set(hf_model):
  model = _nnx_model(hf_model)
  traces = []

  @nnx.jit
  def forward(model, pixels, geometry):
    traces.append(1)
    return model(pixels, geometry)

  def run(grids, seed):
    pixels = _pixels(grids, seed)
    geometry = {k: jnp.asarray(v) for k, v in vision_geometry(grids, CFG).items()}
    return pixels, np.asarray(forward(model, jnp.asarray(pixels), geometry))

  pixels, out = run(MIXED, 3)
  assert _rel_err(out, _hf_forward(hf_model, pixels, MIXED)) <= 1e-4
  run(MIXED, 4)
  assert len(traces) == 1
  run(ONE_IMAGE, 5)
  assert len(traces) == 2
  run(MIXED, 6)
  assert len(traces) == 2
  # The geometry is data, not a static argument: the transposed grid has the same array shapes, so it reuses
  # the compiled forward, and must still be right.
  transposed = ONE_IMAGE[:, [0, 2, 1]]
  pixels, out = run(transposed, 7)
  assert len(traces) == 2
  assert _rel_err(out, _hf_forward(hf_model, pixels, transposed)) <= 1e-4


def test_bad_inputs_raise_clear_errors(hf_model):
  with pytest.raises(ValueError, match=r"image_grid_thw\[1\].*multiples of vision spatial_merge_size 2"):
    vision_geometry(np.array([[1, 4, 4], [1, 5, 4]]), CFG)
  with pytest.raises(ValueError, match="image_grid_thw: expected shape"):
    vision_geometry(np.array([1, 4, 4]), CFG)
  model = _nnx_model(hf_model)
  geometry = {k: jnp.asarray(v) for k, v in vision_geometry(ONE_IMAGE, CFG).items()}
  with pytest.raises(ValueError, match=r"pixel_values: expected shape \(140, 1176\)"):
    model(jnp.zeros((139, CFG.patch_dim)), geometry)
  with pytest.raises(ValueError, match="missing keys"):
    model(jnp.zeros((140, CFG.patch_dim)), {"rotary_pos": geometry["rotary_pos"]})
