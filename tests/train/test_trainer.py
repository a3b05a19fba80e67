"""The contrastive trainer: exact resume after an interruption, GradCache and fsdp/data-parallel sharding compute the
plain step's gradient, and the base weights stay frozen."""

import json

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import tiny as demo
from recall_jax import parallel
from recall_jax.data import pipeline
from recall_jax.data.image import ImageBuckets
from recall_jax.models import qwen2_5_vl
from recall_jax.models.qwen2_5_vl.tiny_tokenizer import build_tiny_tokenizer
from recall_jax.train import optim
from recall_jax.train import step as step_lib
from recall_jax.train import settings, trainer


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
  # Every logged step carries the learning rate AdamW applied at it and the loop's throughput.
  logged = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
  schedule = optim.learning_rate_schedule(1e-2, 6, _cfg().optim.warmup_fraction)
  assert [r["step"] for r in logged] == list(range(1, 7))
  np.testing.assert_allclose([r["train/lr"] for r in logged], [float(schedule(s)) for s in range(6)], rtol=1e-6)
  assert all(r["train/steps_per_s"] > 0 and r["train/examples_per_s"] == 4 * r["train/steps_per_s"] for r in logged)
  # ... and the achieved model FLOP rate: the analytic FLOPs of this step shape (recall_jax.flops) times steps/s,
  # and its fraction of the measured CPU peak (a tiny model is far from it, but it is above 0 and below 1).
  step_flops = logged[0]["train/model_tflops_per_s"] * 1e12 / logged[0]["train/steps_per_s"]
  assert step_flops > 0 and all(
      abs(r["train/model_tflops_per_s"] * 1e12 / r["train/steps_per_s"] - step_flops) <= 1e-6 * step_flops
      for r in logged)
  assert all(0 < r["train/mfu"] < 1 for r in logged)


def test_place_by_rules_shards_matching_params_and_replicates_the_rest():
  model = qwen2_5_vl.Qwen25VLModel(qwen2_5_vl.tiny_config(), rngs=nnx.Rngs(0))
  placed = parallel.place_params(nnx.state(model, nnx.Param), parallel.make_mesh((4, 2, 1)),
                                  [(r"embed_tokens", ("fsdp", None))])
  flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(placed)}
  assert flat["language_model/embed_tokens/embedding"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert not flat["language_model/embed_tokens/embedding"].sharding.is_fully_replicated
  assert flat["lm_head/kernel"].sharding.is_fully_replicated and len(flat["lm_head/kernel"].sharding.device_set) == 8


# The fsdp rules of configs/base.py: base kernels, embeddings and the LM head split over the fsdp axis.
FSDP_RULES = ((r"(q|k|v|o|gate|up|down)_proj/kernel", ("fsdp", None)), (r"embed_tokens|lm_head", (None, "fsdp")))


def _grads(model, cfg, batch, *, num_chunks=1, mesh=None, rules=()):
  """(loss, {adapter path: gradient}) of the trainer's gradient function (`step.make_grad_fn`) at the model's
  current adapters, on `mesh` (default one device) with the frozen params placed by `rules` like `trainer.fit`."""
  mesh = mesh or parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  model.train()
  graphdef, trained, rng_state, rest = nnx.split(model, nnx.LoRAParam, nnx.RngState, ...)
  frozen = (jax.device_put(rng_state, NamedSharding(mesh, P())), parallel.place_params(rest, mesh, rules))
  assert not rules or sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(frozen[1])) > 10
  adapters = jax.device_put(nnx.to_pure_dict(trained), NamedSharding(mesh, P()))
  arrays, geometry = step_lib.host_batch(model.cfg, batch, images_per_call=len(batch["valid"]) // num_chunks)
  arrays = jax.tree.map(lambda x: jax.device_put(x, parallel.batch_sharding(mesh, x.ndim)), arrays)
  grad_fn = jax.jit(step_lib.make_grad_fn(graphdef, settings.loss(cfg.loss), num_chunks=num_chunks))
  (loss, _), grads = grad_fn(adapters, frozen, arrays, geometry, jax.random.key(0))
  model.eval()
  return float(loss), {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.State(grads))}


def _remat_grads(model, cfg, batch, **kw):
  """`_grads` with every decoder layer and vision block under full activation checkpointing (config model.remat)."""
  model.language_model.remat = model.visual.remat = "full"
  try:
    return _grads(model, cfg, batch, **kw)
  finally:
    model.language_model.remat = model.visual.remat = "none"


def test_the_steps_randomness_comes_from_the_carried_key_and_step(fashioniq_train):
  """LoRA dropout: the same (rng, step) gives bit-identical updates, another rng or another step other ones."""
  cfg = _cfg(dropout=0.5)
  model = qwen2_5_vl.Qwen25VLModel(qwen2_5_vl.tiny_config(), rngs=nnx.Rngs(0))
  trainer.add_adapters(model, cfg, seed=0)
  model.train()
  graphdef, trained, rng_state, rest = nnx.split(model, nnx.LoRAParam, nnx.RngState, ...)
  queries, images = fashioniq_train
  enc = pipeline.EncodeConfig(image_buckets=ImageBuckets.square(56), query_lengths=(256,), target_lengths=(128,))
  batch = pipeline.train_dataset(queries, dataset="fashioniq", load=pipeline.FileImages(images),
                                 tokenizer=build_tiny_tokenizer(), cfg=enc, global_batch_size=4, seed=0,
                                 grouped=False)[0]
  arrays, geometry = step_lib.host_batch(model.cfg, batch, images_per_call=4)
  tx = optax.sgd(1.0)
  step = step_lib.make_train_step(graphdef, tx, settings.loss(cfg.loss))
  pure = nnx.to_pure_dict(trained)

  def lora_b_after(seed, at_step):
    state = {"adapters": jax.tree.map(np.array, pure), "opt_state": tx.init(pure), "step": np.int32(at_step),
             "rng": jax.random.key_data(jax.random.key(seed))}
    new, _ = step(state, (rng_state, rest), arrays, geometry)
    # lora_b starts at zero: its gradient reads the dropped-out inputs, so the mask shows in the update
    return np.concatenate([np.ravel(v) for k, v in nnx.to_flat_state(nnx.State(new["adapters"]))
                           if k[-1] == "lora_b"])

  first = lora_b_after(0, 0)
  np.testing.assert_array_equal(lora_b_after(0, 0), first)
  assert not np.array_equal(lora_b_after(1, 0), first)
  assert not np.array_equal(lora_b_after(0, 1), first)


def test_gradcache_and_sharding_equal_the_plain_step(fashioniq_train, tmp_path):
  """GradCache (4 chunks) and a (4, 2, 1) mesh with the fsdp rules compute the plain step's loss and gradient.

  Compared are the gradients, at a tolerance relative to their scale: parameters after Adam steps are not comparable
  across programs (Adam moves an entry by ~lr whatever its gradient, so an entry with a tiny gradient moves by
  reduction-order noise)."""
  cfg = _cfg(steps=1, batch=8, dropout=0.0)
  plain, r_plain = _train(cfg, fashioniq_train, tmp_path / "plain")
  # The trainer's own plumbing (chunk size -> chunks, images per call, sharded batch and base): the first step's
  # loss and gradient norm are functions of the same initial adapters, so they agree across programs.
  both_cfg = _cfg(steps=1, batch=8, chunk=2, dropout=0.0)
  both_cfg.sharding.rules = FSDP_RULES
  _, r_both = _train(both_cfg, fashioniq_train, tmp_path / "chunked_sharded", mesh=parallel.make_mesh((4, 2, 1)))
  for k in ("loss", "grad_norm"):
    np.testing.assert_allclose(r_both.last_metrics[k], r_plain.last_metrics[k], rtol=1e-4, err_msg=k)

  # Gradients at the trained adapters (lora_b != 0 after a step, so every adapter leaf has a gradient).
  queries, images = fashioniq_train
  enc = pipeline.EncodeConfig(image_buckets=ImageBuckets.square(56), query_lengths=(256,), target_lengths=(128,))
  batch = pipeline.train_dataset(queries, dataset="fashioniq", load=pipeline.FileImages(images),
                                 tokenizer=build_tiny_tokenizer(), cfg=enc, global_batch_size=8, seed=cfg.seed,
                                 grouped=False)[1]
  ref_loss, ref = _grads(plain, cfg, batch)
  assert len(ref) > 0 and all(np.abs(g).max() > 0 for g in ref.values())
  scale = max(np.abs(g).max() for g in ref.values())
  for name, (loss, grads) in {
      "gradcache": _grads(plain, cfg, batch, num_chunks=4),
      "sharded": _grads(plain, cfg, batch, mesh=parallel.make_mesh((4, 2, 1)), rules=FSDP_RULES),
      "remat, gradcache": _remat_grads(plain, cfg, batch, num_chunks=4)}.items():
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=name)
    assert grads.keys() == ref.keys()
    for k in ref:
      # fp32 reduction-order noise is up to ~2e-5 of the gradient's scale (globally and per leaf, with one or many
      # threads); leaving out one GradCache chunk is ~2e-2.
      np.testing.assert_allclose(grads[k], ref[k], rtol=0, atol=2e-4 * scale, err_msg=f"{name} {k}")
      assert np.linalg.norm(grads[k] - ref[k]) <= 1e-3 * np.linalg.norm(ref[k]), f"{name} {k}: relative to the leaf"

  # Training moved the adapters but never the base weights (same paths, bit-identical values).
  fresh = dict(nnx.to_flat_state(nnx.state(qwen2_5_vl.Qwen25VLModel(qwen2_5_vl.tiny_config(), rngs=nnx.Rngs(0)),
                                           nnx.Param)))
  base = dict(nnx.to_flat_state(nnx.state(plain, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))))
  assert base.keys() == fresh.keys()
  for k in base:
    np.testing.assert_array_equal(np.asarray(base[k]), np.asarray(fresh[k]), err_msg=str(k))
  assert any(np.abs(v).max() > 0 for k, v in _adapters(plain).items() if k.endswith("lora_b"))


def test_a_crash_during_an_eval_resumes_before_it_and_evaluates_that_step_again(fashioniq_train, tmp_path):
  """The step's checkpoint is written after its eval: resuming from the one before redoes the eval, so the best
  checkpoint equals an uninterrupted run's. A checkpoint past a lowered train.steps is refused."""
  cfg = _cfg()
  cfg.train.eval_every = 3

  def evaluator(calls, crash_at=None):
    def eval_fn(model):
      calls.append(len(calls) + 1)
      if crash_at == len(calls):
        raise RuntimeError("simulated crash during the eval")
      lora_sum = sum(float(np.asarray(v).sum()) for _, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))
      return {cfg.train.best_metric: -abs(lora_sum - 1.0)}  # deterministic in the adapters: the same best
    return eval_fn

  def run(out, eval_fn):
    queries, images = fashioniq_train
    model = qwen2_5_vl.Qwen25VLModel(qwen2_5_vl.tiny_config(), rngs=nnx.Rngs(0))
    enc = pipeline.EncodeConfig(image_buckets=ImageBuckets.square(56), query_lengths=(256,), target_lengths=(128,))
    return trainer.train(cfg, model, build_tiny_tokenizer(), queries, dataset="fashioniq",
                         load=pipeline.FileImages(images), encode_cfg=enc, out_dir=str(out), eval_fn=eval_fn,
                         mesh=parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1]))

  straight_calls, crashed_calls, resumed_calls = [], [], []
  straight = run(tmp_path / "straight", evaluator(straight_calls))
  with pytest.raises(RuntimeError, match="simulated crash"):
    run(tmp_path / "crashed", evaluator(crashed_calls, crash_at=2))  # the eval at step 6
  resumed = run(tmp_path / "crashed", evaluator(resumed_calls))
  assert len(straight_calls) == 2 and len(resumed_calls) == 1  # step 6 evaluated again after the resume
  assert (resumed.best_step, resumed.best_metrics) == (straight.best_step, straight.best_metrics)
  cfg.train.steps = 3
  with pytest.raises(ValueError, match="checkpoint is at step 6, past train.steps = 3"):
    run(tmp_path / "crashed", evaluator([]))
