"""flops.py against the matmuls the lowered programs hold: at tiny widths and loop-free shapes (one GradCache chunk:
XLA's own count would see a loop body once), the analytic count equals the sum over every dot_general of the
program's StableHLO, each function counted as often as it is called."""

import collections
import math
import re

import jax
import pytest
from ml_collections import ConfigDict

from configs import tiny as tiny_config
from recall_jax import abstract_programs, flops, parallel
from recall_jax.models.qwen2_5_vl import names
from recall_jax.models.qwen2_5_vl.tiny import tiny_config as tiny_model_config

_FUNC = re.compile(r"func\.func (?:public |private )?@([\w.$-]+)\(")
_CALL = re.compile(r"call @([\w.$-]+)\(")
_DOT = re.compile(r"stablehlo\.dot_general .*?contracting_dims = \[([\d, ]*)\] x \[[\d, ]*\].*?: "
                  r"\(tensor<([\dx]*)x?\w+>, tensor<[^>]*>\) -> tensor<([\dx]*)x?\w+>")


def _dims(text: str) -> list[int]:
  return [int(d) for d in text.split("x") if d]


def dot_flops(stablehlo: str) -> int:
  """2 x (output elements) x (contracted size) summed over every dot_general reached from @main."""
  bodies, name = collections.defaultdict(list), None
  for line in stablehlo.splitlines():
    m = _FUNC.search(line)
    if m:
      name = m.group(1)
    bodies[name].append(line)
  own, calls = {}, {}
  for fn, lines in bodies.items():
    text = "\n".join(lines)
    own[fn] = 0
    for m in _DOT.finditer(text):
      lhs, out = _dims(m.group(2)), _dims(m.group(3))
      contracted = math.prod(lhs[int(c)] for c in m.group(1).replace(" ", "").split(",") if c)
      own[fn] += 2 * math.prod(out) * contracted
    calls[fn] = collections.Counter(_CALL.findall(text))

  def total(fn):
    return own[fn] + sum(n * total(callee) for callee, n in calls[fn].items())

  return total("main")


def _config(chunk_size: int = 0) -> ConfigDict:
  cfg = tiny_config.get_config()
  cfg.data.image_buckets = 140  # 10 x 10 patches: 2 x 2 windows, padded (5 merged tokens per side, 4 per window)
  cfg.data.query_lengths, cfg.data.target_lengths = (64,), (48,)
  cfg.train.global_batch_size, cfg.train.chunk_size = 8, chunk_size
  cfg.eval.batch_size = cfg.mine.batch_size = 8
  cfg.calibrate.batch_size, cfg.calibrate.prompt_lengths, cfg.calibrate.max_new_tokens = 8, (96,), 4
  cfg.mesh.shape = (-1, 1, 1)
  return cfg


def _model_config():
  # Three text layers and three vision blocks, one of them full attention: every kind of stage appears.
  return tiny_model_config(text=dict(num_hidden_layers=3), vision=dict(depth=3, fullatt_block_indexes=(1,)))


def _adapters(cfg):
  return flops.Adapters(regex=cfg.lora.target_regex or names.LORA_TARGET_REGEX, rank=cfg.lora.rank,
                        dora=cfg.lora.use_dora, dropout=cfg.lora.dropout > 0)


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh((-1, 1, 1), devices=jax.devices()[:8])


def test_embedding_pass_flops_equal_the_programs_matmuls(mesh):
  cfg, model_cfg = _config(), _model_config()
  grid = abstract_programs.image_grid(cfg, model_cfg)
  expected = flops.embed_side(model_cfg, 8, 64, grid)[0]
  assert dot_flops(abstract_programs.embed(cfg, model_cfg, mesh).as_text()) == expected


def test_prefill_flops_equal_the_programs_matmuls(mesh):
  cfg, model_cfg = _config(), _model_config()
  prefill, _ = abstract_programs.calibrate(cfg, model_cfg, mesh)
  expected = flops.prefill(model_cfg, batch=8, prompt_length=96, cache_length=100,
                           grid=abstract_programs.image_grid(cfg, model_cfg), images_per_prompt=2)
  assert dot_flops(prefill.as_text()) == expected


@pytest.mark.parametrize("use_dora", [True, False])
def test_training_step_flops_equal_the_programs_matmuls(mesh, use_dora):
  """Forward and backward with DoRA (dropout active: the base matmul twice) and plain LoRA, one chunk."""
  cfg, model_cfg = _config(), _model_config()
  cfg.lora.use_dora = use_dora
  expected = flops.train_step(model_cfg, batch=8, num_chunks=1, query_length=64, target_length=48,
                              grid=abstract_programs.image_grid(cfg, model_cfg), adapters=_adapters(cfg))
  assert dot_flops(abstract_programs.train(cfg, model_cfg, mesh).as_text()) == expected["total"]


def test_gradcache_counts_each_chunk_twice_forward_once_backward():
  model_cfg = _model_config()
  adapters = flops.Adapters(regex=names.LORA_TARGET_REGEX, rank=4, dora=True, dropout=True)
  kw = dict(query_length=64, target_length=48, grid=(1, 10, 10), adapters=adapters)
  one = flops.train_step(model_cfg, batch=8, num_chunks=1, **kw)
  chunked = flops.train_step(model_cfg, batch=16, num_chunks=2, **kw)
  loss_fwd, loss_bwd = (flops.contrastive_loss(b, 64, False) for b in (8, 16))
  assert chunked["backward"] - loss_bwd[1] == 2 * (one["backward"] - loss_fwd[1])
  assert chunked["forward"] - loss_bwd[0] == 4 * (one["forward"] - loss_fwd[0])
