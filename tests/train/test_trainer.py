"""The contrastive trainer: exact resume after an interruption, GradCache and data-parallel sharding change nothing,
and the base weights stay frozen."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs import demo
from recall_jax import parallel
from recall_jax.data import pipeline
from recall_jax.data.image import ImageBuckets
from recall_jax.models import qwen2_5_vl
from recall_jax.models.qwen2_5_vl.tiny_tokenizer import build_tiny_tokenizer
from recall_jax.train import trainer


def _cfg(steps=6, batch=4, chunk=0, dropout=0.1):
  cfg = demo.get_config()
  cfg.train.steps, cfg.train.global_batch_size, cfg.train.chunk_size = steps, batch, chunk
  cfg.train.log_every, cfg.train.checkpoint_every = 1, 3
  cfg.train.data_threads = 1
  cfg.lora.rank, cfg.lora.dropout = 4, dropout
  cfg.optim.lr = 1e-2
  return cfg


def _train(cfg, fashioniq_train, out, mesh=None, stop_after=None):
  queries, images = fashioniq_train
  model = qwen2_5_vl.Qwen25VLModel(qwen2_5_vl.tiny_config(), rngs=nnx.Rngs(0))
  enc = pipeline.EncodeConfig(image_buckets=ImageBuckets.square(56), query_lengths=(256,), target_lengths=(128,))
  result = trainer.train(cfg, model, build_tiny_tokenizer(), queries, dataset="fashioniq",
                         load=pipeline.FileImages(images), encode_cfg=enc, out_dir=str(out),
                         mesh=mesh or parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1]), stop_after=stop_after)
  return model, result


def _adapters(model):
  return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}


def test_resume_after_interruption_equals_uninterrupted(fashioniq_train, tmp_path):
  straight, r1 = _train(_cfg(), fashioniq_train, tmp_path / "straight")
  assert r1.steps == 6 and (tmp_path / "straight" / "adapters" / "adapter_model.safetensors").exists()

  _, r_half = _train(_cfg(), fashioniq_train, tmp_path / "resumed", stop_after=3)  # "killed" after the step-3 checkpoint
  assert r_half.steps == 3 and not (tmp_path / "resumed" / "adapters").exists()
  resumed, r2 = _train(_cfg(), fashioniq_train, tmp_path / "resumed")  # a fresh process: new model, new iterator
  assert r2.steps == 6
  a, b = _adapters(straight), _adapters(resumed)
  assert a.keys() == b.keys() and len(a) > 0
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert r1.last_metrics["loss"] == r2.last_metrics["loss"]
  assert r1.compilations == r2.compilations == 1  # static shapes: one compilation of the step per run


def test_place_by_rules_shards_matching_params_and_replicates_the_rest():
  model = qwen2_5_vl.Qwen25VLModel(qwen2_5_vl.tiny_config(), rngs=nnx.Rngs(0))
  placed = trainer.place_by_rules(nnx.state(model, nnx.Param), parallel.make_mesh((4, 2, 1)),
                                  [(r"embed_tokens", ("fsdp", None))])
  flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(placed)}
  assert flat["language_model/embed_tokens/embedding"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert not flat["language_model/embed_tokens/embedding"].sharding.is_fully_replicated
  assert flat["lm_head/kernel"].sharding.is_fully_replicated and len(flat["lm_head/kernel"].sharding.device_set) == 8


def test_gradcache_and_sharding_equal_the_plain_step(fashioniq_train, tmp_path):
  plain, _ = _train(_cfg(steps=2, batch=8, dropout=0.0), fashioniq_train, tmp_path / "plain")
  chunked, _ = _train(_cfg(steps=2, batch=8, chunk=2, dropout=0.0), fashioniq_train, tmp_path / "chunked")
  sharded_cfg = _cfg(steps=2, batch=8, dropout=0.0)
  sharded_cfg.sharding.rules = ((r"embed_tokens", ("fsdp", None)), (r"lm_head/kernel", (None, "fsdp")))
  sharded, _ = _train(sharded_cfg, fashioniq_train, tmp_path / "sharded", mesh=parallel.make_mesh((4, 2, 1)))
  ref = _adapters(plain)
  for other in (_adapters(chunked), _adapters(sharded)):
    for k in ref:
      np.testing.assert_allclose(other[k], ref[k], rtol=2e-4, atol=2e-6, err_msg=k)
  # Training moved the adapters but never the base weights (same paths, bit-identical values).
  fresh = dict(nnx.to_flat_state(nnx.state(qwen2_5_vl.Qwen25VLModel(qwen2_5_vl.tiny_config(), rngs=nnx.Rngs(0)),
                                           nnx.Param)))
  base = dict(nnx.to_flat_state(nnx.state(plain, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))))
  assert base.keys() == fresh.keys()
  for k in base:
    np.testing.assert_array_equal(np.asarray(base[k]), np.asarray(fresh[k]), err_msg=str(k))
  assert any(np.abs(v).max() > 0 for k, v in ref.items() if k.endswith("lora_b"))
