"""LoRA/DoRA adapters against peft (torch) on a small attention + MLP model with the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from flax import nnx

from recall_jax.models import lora

D, FF, LAYERS, SEQ = 16, 24, 2, 5
TARGETS = r"layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.down_proj)"


class TorchBlock(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.self_attn = torch.nn.Module()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      setattr(self.self_attn, name, torch.nn.Linear(D, D, bias=name != "o_proj"))
    self.mlp = torch.nn.Module()
    self.mlp.gate_proj = torch.nn.Linear(D, FF, bias=False)
    self.mlp.up_proj = torch.nn.Linear(D, FF, bias=False)
    self.mlp.down_proj = torch.nn.Linear(FF, D, bias=True)

  def forward(self, x):
    a = self.self_attn
    q, k, v = a.q_proj(x), a.k_proj(x), a.v_proj(x)
    att = torch.softmax(q @ k.transpose(-1, -2) / D**0.5, dim=-1)
    x = x + a.o_proj(att @ v)
    m = self.mlp
    return x + m.down_proj(torch.nn.functional.silu(m.gate_proj(x)) * m.up_proj(x))


class TorchModel(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.layers = torch.nn.ModuleList([TorchBlock() for _ in range(LAYERS)])

  def forward(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


class Attn(nnx.Module):

  def __init__(self, dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.q_proj = nnx.Linear(D, D, **kw)
    self.k_proj = nnx.Linear(D, D, **kw)
    self.v_proj = nnx.Linear(D, D, **kw)
    self.o_proj = nnx.Linear(D, D, use_bias=False, **kw)


class Mlp(nnx.Module):

  def __init__(self, dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.gate_proj = nnx.Linear(D, FF, use_bias=False, **kw)
    self.up_proj = nnx.Linear(D, FF, use_bias=False, **kw)
    self.down_proj = nnx.Linear(FF, D, **kw)


class Block(nnx.Module):

  def __init__(self, dtype, rngs):
    self.self_attn = Attn(dtype, rngs)
    self.mlp = Mlp(dtype, rngs)

  def __call__(self, x):
    a = self.self_attn
    q, k, v = a.q_proj(x), a.k_proj(x), a.v_proj(x)
    att = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / D**0.5, axis=-1)
    x = x + a.o_proj(att @ v)
    m = self.mlp
    return x + m.down_proj(jax.nn.silu(m.gate_proj(x)) * m.up_proj(x))


class Model(nnx.Module):

  def __init__(self, dtype=jnp.float32, *, rngs):
    self.layers = nnx.List([Block(dtype, rngs) for _ in range(LAYERS)])

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


def _torch_model(seed=0):
  torch.manual_seed(seed)
  return TorchModel().eval()


def _nnx_from_torch(tm, dtype=jnp.float32):
  """An NNX model carrying the base weights of `tm` (kernel = weight.T)."""
  model = Model(dtype, rngs=nnx.Rngs(0))
  modules = dict(nnx.iter_modules(model))
  for name, tmod in tm.named_modules():
    if isinstance(tmod, torch.nn.Linear):
      path = tuple(int(p) if p.isdigit() else p for p in name.split("."))
      lin = modules[path]
      lin.kernel[...] = jnp.asarray(tmod.weight.detach().numpy().T, dtype)
      if tmod.bias is not None:
        lin.bias[...] = jnp.asarray(tmod.bias.detach().numpy(), dtype)
  return model


def _peft_model(tm, use_dora, rank=4, alpha=8):
  cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, use_dora=use_dora,
                        init_lora_weights="gaussian")
  pm = peft.get_peft_model(tm, cfg)
  return pm


def _randomize_peft(pm, seed=1):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_" in name:
        p.copy_(p + 0.05 * torch.randn(p.shape, generator=g))
  return pm


def _randomize_nnx(model, seed=1):
  rng = np.random.default_rng(seed)
  for m in lora.lora_modules(model).values():
    for var in (m.lora_a, m.lora_b) + ((m.lora_magnitude,) if m.use_dora else ()):
      var[...] = var[...] + 0.05 * jnp.asarray(rng.standard_normal(var.shape), var[...].dtype)


def _copy_peft_to_nnx(pm, model):
  """Independent of import_peft: walks the peft modules and sets the NNX adapters by name."""
  modules = lora.lora_modules(model)
  for name, tmod in pm.base_model.model.named_modules():
    if isinstance(tmod, peft.tuners.lora.Linear):
      m = modules[name]
      m.lora_a[...] = jnp.asarray(tmod.lora_A["default"].weight.detach().numpy().T)
      m.lora_b[...] = jnp.asarray(tmod.lora_B["default"].weight.detach().numpy().T)
      if m.use_dora:
        m.lora_magnitude[...] = jnp.asarray(tmod.lora_magnitude_vector["default"].weight.detach().numpy())
  assert len(modules) == 5 * LAYERS


def _x(seed=0):
  return np.random.default_rng(seed).standard_normal((3, SEQ, D)).astype(np.float32)


def _torch_out(pm, x):
  with torch.no_grad():
    return pm(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("use_dora", [False, True])
def test_forward_and_grads_match_peft(use_dora):
  tm = _torch_model()
  model = _nnx_from_torch(tm)
  paths = lora.apply_lora(model, TARGETS, rank=4, alpha=8, use_dora=use_dora, init="gaussian", rngs=nnx.Rngs(1))
  assert len(paths) == 5 * LAYERS and "layers.1.mlp.down_proj" in paths
  pm = _randomize_peft(_peft_model(tm, use_dora))
  _copy_peft_to_nnx(pm, model)
  x = _x()
  np.testing.assert_allclose(model(jnp.asarray(x)), _torch_out(pm, x), atol=1e-5, rtol=1e-5)

  # Gradients of a scalar loss w.r.t. every adapter tensor: equal to torch's (this checks the detached DoRA norm).
  xt = torch.from_numpy(x)
  pm.zero_grad()
  (pm(xt) ** 2).mean().backward()
  graph, params, rest = nnx.split(model, nnx.LoRAParam, ...)

  def loss(p):
    return jnp.mean(nnx.merge(graph, p, rest)(jnp.asarray(x)) ** 2)

  grads = dict(nnx.to_flat_state(jax.grad(loss)(params)))
  torch_grads = {n: p.grad.numpy() for n, p in pm.base_model.model.named_parameters() if p.grad is not None}
  names = {"lora_a": "lora_A.default.weight", "lora_b": "lora_B.default.weight",
           "lora_magnitude": "lora_magnitude_vector.default.weight"}
  assert len(grads) == len(torch_grads) == (3 if use_dora else 2) * 5 * LAYERS
  for path, g in grads.items():
    tname = ".".join(str(p) for p in path[:-1]) + "." + names[path[-1]]
    ref = torch_grads[tname]
    np.testing.assert_allclose(g[...], ref if path[-1] == "lora_magnitude" else ref.T, atol=1e-5, rtol=1e-4,
                               err_msg=tname)


def test_init_distributions_and_fresh_adapter_is_identity():
  tm = _torch_model()
  base = _nnx_from_torch(tm)
  x = jnp.asarray(_x())
  y0 = base(x)
  for init, check in (("gaussian", lambda a, r: abs(np.std(a) * r - 1) < 0.1),
                      ("kaiming", lambda a, r: np.abs(a).max() <= 1 / np.sqrt(a.shape[0]) and
                       np.abs(a).max() > 0.9 / np.sqrt(a.shape[0]))):
    model = _nnx_from_torch(tm)
    lora.apply_lora(model, r"layers\.\d+\.mlp\.down_proj", rank=8, alpha=16, use_dora=True, init=init,
                    rngs=nnx.Rngs(0))
    a = np.concatenate([np.asarray(m.lora_a[...]).ravel() for m in lora.lora_modules(model).values()])
    assert check(a.reshape(-1, 8) if init == "gaussian" else a.reshape(FF, -1), 8), init
    # B = 0 and m = ||W|| make a fresh adapter exact identity.
    np.testing.assert_allclose(model(x), y0, atol=1e-6)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_equals_unmerged(use_dora):
  model = _nnx_from_torch(_torch_model())
  lora.apply_lora(model, TARGETS, rank=4, alpha=8, use_dora=use_dora, rngs=nnx.Rngs(0))
  _randomize_nnx(model, seed=7)
  x = jnp.asarray(_x(8))
  y = model(x)
  merged = lora.merge_lora(model)
  assert len(merged) == 5 * LAYERS and not lora.lora_modules(model)
  assert type(model.layers[0].self_attn.q_proj) is nnx.Linear
  assert not nnx.state(model, nnx.LoRAParam)
  np.testing.assert_allclose(model(x), y, atol=1e-5, rtol=1e-5)


def test_only_adapters_get_gradients_and_optimizer_state():
  model = _nnx_from_torch(_torch_model())
  lora.apply_lora(model, TARGETS, rank=4, alpha=8, use_dora=True, rngs=nnx.Rngs(0))
  _randomize_nnx(model)
  base_before = jax.tree.map(np.asarray, nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
  n_adapter = len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
  assert n_adapter == 3 * 5 * LAYERS
  # Adam state: mu and nu per adapter leaf (+ count); nothing for the base.
  assert len(jax.tree.leaves(optimizer.opt_state)) == 2 * n_adapter + 1
  x = jnp.asarray(_x())

  def loss_fn(m):
    return jnp.mean(m(x) ** 2)

  grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
  flat = dict(nnx.to_flat_state(grads))
  assert {p[-1] for p in flat} == {"lora_a", "lora_b", "lora_magnitude"}
  assert all(np.abs(np.asarray(g[...])).max() > 0 for g in flat.values())
  optimizer.update(model, grads)
  base_after = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
  jax.tree.map(np.testing.assert_array_equal, base_before, jax.tree.map(np.asarray, base_after))


def test_bf16_base_with_fp32_adapters():
  tm = _torch_model()
  ref = _nnx_from_torch(tm)
  lora.apply_lora(ref, TARGETS, rank=4, alpha=8, use_dora=True, rngs=nnx.Rngs(0))
  _randomize_nnx(ref)
  model = _nnx_from_torch(tm, jnp.bfloat16)
  lora.apply_lora(model, TARGETS, rank=4, alpha=8, use_dora=True, rngs=nnx.Rngs(0))
  _randomize_nnx(model)
  m = lora.lora_modules(model)["layers.0.mlp.down_proj"]
  assert m.kernel[...].dtype == jnp.bfloat16 and m.lora_a[...].dtype == jnp.float32
  assert m.lora_magnitude[...].dtype == jnp.float32
  x = jnp.asarray(_x())
  y = nnx.jit(lambda mod, x: mod(x))(model, x.astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), ref(x), atol=0.15, rtol=0.05)
  grads = nnx.jit(nnx.grad(lambda mod: jnp.mean(mod(x.astype(jnp.bfloat16)).astype(jnp.float32) ** 2),
                   argnums=nnx.DiffState(0, nnx.LoRAParam)))(model)
  assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


class _FixedMaskNnx(nnx.Module):
  """Stands in for nnx.Dropout with a known mask, so the training-mode formula can be compared with peft."""

  def __init__(self, mask):
    self.rate = 0.5
    self.deterministic = False
    self.mask = nnx.Variable(mask)

  def __call__(self, x):
    return x * self.mask[...]


class _FixedMaskTorch(torch.nn.Module):

  def __init__(self, mask):
    super().__init__()
    self.mask = torch.from_numpy(np.asarray(mask))

  def forward(self, x):
    return x * self.mask


@pytest.mark.parametrize("use_dora", [False, True])
def test_dropout_in_training_mode_matches_peft(use_dora):
  tm = _torch_model()
  model = _nnx_from_torch(tm)
  lora.apply_lora(model, TARGETS, rank=4, alpha=8, dropout=0.5, use_dora=use_dora, rngs=nnx.Rngs(0))
  pm = _randomize_peft(_peft_model(tm, use_dora))
  _copy_peft_to_nnx(pm, model)
  x = _x(9)
  m = model.layers[0].mlp.down_proj
  mask = (np.random.default_rng(0).random((3, SEQ, FF)) > 0.5).astype(np.float32) * 2.0
  m.dropout = _FixedMaskNnx(jnp.asarray(mask))
  tmod = pm.base_model.model.layers[0].mlp.down_proj
  tmod.lora_dropout["default"] = _FixedMaskTorch(mask)
  pm.train()
  model.eval()  # every other adapter: no dropout, as their torch counterparts (Identity, lora_dropout=0).
  m.dropout.deterministic = False
  y_train = model(jnp.asarray(x))
  np.testing.assert_allclose(y_train, _torch_out(pm, x), atol=1e-5, rtol=1e-5)
  m.dropout.deterministic = True
  assert not np.allclose(model(jnp.asarray(x)), y_train, atol=1e-3)


def test_target_selection_errors():
  model = _nnx_from_torch(_torch_model())
  with pytest.raises(ValueError, match="matches no module"):
    lora.apply_lora(model, r"nothing", rank=2, alpha=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="'layers.0.mlp', a Mlp, not an nnx.Linear"):
    lora.apply_lora(model, r"layers\.0\.mlp", rank=2, alpha=2, rngs=nnx.Rngs(0))
  lora.apply_lora(model, r"layers\.0\.mlp\.down_proj", rank=2, alpha=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="already has a LoRA adapter"):
    lora.apply_lora(model, r"layers\.0\.mlp\.down_proj", rank=2, alpha=2, rngs=nnx.Rngs(0))
