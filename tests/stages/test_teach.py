"""The teach stage on the tiny world: a fine-tuned Hugging Face checkpoint (full fine-tuning by regex, or LoRA merged
into the base) that the calibrate stage then takes as its foundation model."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from configs import demo as demo_config
from configs import tiny as demo
from recall_jax import main, parallel
from recall_jax.models import qwen2_5_vl
from recall_jax.data.synthetic import fresh
from recall_jax.stages import artifacts, common, paths, teach, teach_cache
from recall_jax.train import vision_pretrain


def _config(trainable_regex):
  cfg = demo.get_config()
  cfg.world.scale = "tiny"
  cfg.world.image_size = 56
  cfg.data.image_buckets = 56
  cfg.data.dataset = "cirr"
  cfg.teach.tasks = ("caption", "verify")
  cfg.teach.lengths = (128, 768)
  cfg.teach.batch_size = 2
  cfg.teach.steps = 2
  cfg.teach.log_every = 1
  cfg.teach.trainable_regex = trainable_regex
  cfg.teach.lora.rank = 4
  cfg.teach.optim.lr = 1e-2
  cfg.teach.optim.warmup_fraction = 0.0
  cfg.mesh.shape = (2, 1, 4)  # the 8 test devices; the batch of 2 splits over data
  return cfg


def _params(path):
  model = qwen2_5_vl.from_pretrained(path)
  return {".".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("teach"))
  main.run(_config(".*"), workdir, ["prepare"])
  return workdir


def _teach(prepared, tmp_path, regex, probe_every=0):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  os.symlink(os.path.join(prepared, "prepare"), os.path.join(workdir, "prepare"))  # share the world and base
  cfg = _config(regex)
  cfg.teach.probe_every = probe_every
  assert common.foundation_checkpoint(cfg, workdir) == paths.checkpoint_dir(cfg, workdir)
  main.run(cfg, workdir, ["teach"])
  manifest = artifacts.read_manifest(workdir, "teach")
  return cfg, workdir, manifest


def test_full_fine_tuning_writes_the_checkpoint_calibrate_uses(prepared, tmp_path):
  cfg, workdir, manifest = _teach(prepared, tmp_path, ".*", probe_every=1)
  probes = [r for r in artifacts.read_jsonl(os.path.join(workdir, "teach", "metrics.jsonl"))
            if "val/image_dependence" in r]
  assert len(probes) == 2 and all(0 <= r["val/image_dependence"] <= 0.5 for r in probes)  # logged every step
  path = os.path.join(workdir, "teach", teach.CHECKPOINT)
  assert manifest["checkpoint"] == path and manifest["steps"] == 2
  assert set(manifest["examples_by_task"]) == {"caption", "verify"}
  assert np.isfinite(manifest["last_train_metrics"]["loss"])
  assert os.path.exists(os.path.join(path, "tokenizer_config.json"))
  assert common.foundation_checkpoint(cfg, workdir) == path
  base, taught = _params(paths.checkpoint_dir(cfg, workdir)), _params(path)
  assert base.keys() == taught.keys()
  for name in ("language_model.embed_tokens.embedding", "lm_head.kernel", "visual.patch_embed.proj.kernel"):
    assert not np.array_equal(base[name], taught[name]), name


def test_the_vision_phase_adds_fresh_renders_with_their_labels(prepared, tmp_path, monkeypatch):
  cfg = _config(".*")
  cfg.teach.vision.update({"steps": 1, "batch_size": 2, "val_images": 0, "fresh_images": 5})
  seen = {}

  def pretrain(model, pixels, grid, labels, classes, vcfg, val=None):
    seen.update(pixels=pixels, labels=labels)
    return {"steps": vcfg.steps}

  monkeypatch.setattr(teach.vision_pretrain, "pretrain_vision", pretrain)
  splits = common.read_splits(cfg, prepared, "train")
  n = len({name for s in splits for name in s.images})
  model, _ = common.load_base_model(cfg, prepared, paths.checkpoint_dir(cfg, prepared))
  figures = teach.teach_vision(model, cfg, prepared, str(tmp_path / "teach"), splits)
  assert figures["images"] == n and figures["fresh_images"] == 5 and len(seen["pixels"]) == n + 5
  garments = fresh.fresh_garments(5, (cfg.world.seed, cfg.seed))
  expected = vision_pretrain.labels_for(dict(enumerate(garments)), range(5), teach.VISION_ATTRIBUTES, teach._VALUES)
  np.testing.assert_array_equal(seen["labels"][n:], expected)
  assert np.abs(seen["pixels"][n:] - seen["pixels"][n - 1]).max() > 0  # rendered images, not copies or blanks


def test_lora_is_merged_into_the_targets_only(prepared, tmp_path):
  cfg, workdir, manifest = _teach(prepared, tmp_path, "")
  assert manifest["mode"].startswith("LoRA rank 4")
  base, taught = _params(paths.checkpoint_dir(cfg, workdir)), _params(manifest["checkpoint"])
  assert base.keys() == taught.keys()  # a plain checkpoint: adapters merged, none left
  changed = {k for k in base if not np.array_equal(base[k], taught[k])}
  assert changed and all(k.startswith("language_model.layers.") and k.endswith("_proj.kernel") for k in changed)
  assert "language_model.layers.0.self_attn.q_proj.kernel" in changed


def test_a_short_teach_raises_vqa_accuracy_over_the_untrained_model(tmp_path):
  """Vision phase + describe-then-decide fine-tuning on yes/no questions, then F's VQA accuracy (against the oracle)
  beside the untrained model's: the recipe of the demo at a tiny scale. Measured on the training images: a world
  this small (~90 images) is too small for a few hundred steps to generalise to val (measured: 0.44-0.51)."""
  from recall_jax.stages import foundation_quality
  cfg = _config(".*")
  demo_cfg = demo_config.get_config()  # the demo's tiny F: world BPE, 128 x 4 text, 64 x 4 vision
  cfg.model.tiny, cfg.model.tiny_tokenizer = demo_cfg.model.tiny, demo_cfg.model.tiny_tokenizer
  cfg.data.dataset = "fashioniq"
  cfg.teach.tasks = ("caption", "vqa")
  cfg.teach.reasoning = "describe"
  cfg.teach.vqa_pairs = 3
  cfg.teach.lengths = (64,)
  cfg.teach.batch_size = 32
  cfg.teach.steps = 300
  cfg.teach.optim.lr = 3e-3
  cfg.teach.optim.warmup_fraction = 0.05
  cfg.teach.log_every = 50
  cfg.teach.vision.steps = 200
  cfg.teach.vision.batch_size = 16
  cfg.teach.vision.val_images = 32
  cfg.teach.quality.enabled = True
  cfg.teach.quality.vqa_images = 48
  cfg.teach.quality.rewrite_queries = 0
  cfg.teach.quality.verify_queries = 0
  workdir = str(tmp_path)
  # One device: this test is about what teaching does (sharded == unsharded is test_trainer's), and 500 steps over
  # 8 host devices on 2 cores took 14 min alone against 6 on one.
  one = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  main.run(cfg, workdir, ["prepare"], mesh=one)
  untrained, tokenizer = common.load_base_model(cfg, workdir, mesh=one)
  before = foundation_quality.evaluate_foundation(untrained, tokenizer, cfg, workdir, split="train",
                                                  mesh=one)["vqa_accuracy"]
  cfg.teach.quality.enabled = False
  main.run(cfg, workdir, ["teach"], mesh=one)
  manifest = artifacts.read_manifest(workdir, "teach")
  taught, tokenizer = common.load_base_model(cfg, workdir, manifest["checkpoint"], mesh=one)
  after = foundation_quality.evaluate_foundation(taught, tokenizer, cfg, workdir, split="train",
                                                 mesh=one)["vqa_accuracy"]
  assert manifest["vision"]["val_accuracy"]["colour"] > 0.3  # chance is 1/11 (measured 0.81)
  assert after >= before + 0.06, (before, after)  # measured 0.50 -> 0.61 over 96 questions


def test_a_finished_teach_is_reused_from_the_cache_by_another_workdir(prepared, tmp_path):
  cache = str(tmp_path / "cache")
  runs = {}
  for name in ("first", "second"):
    workdir = str(tmp_path / name)
    os.makedirs(workdir)
    os.symlink(os.path.join(prepared, "prepare"), os.path.join(workdir, "prepare"))
    cfg = _config(".*")
    cfg.teach.cache_dir = cache
    main.run(cfg, workdir, ["teach"])
    runs[name] = (workdir, artifacts.read_manifest(workdir, "teach"))
  (first, taught), (second, reused) = runs["first"], runs["second"]
  assert teach_cache.key(cfg, first) == teach_cache.key(cfg, second)  # the workdir's path is not part of F
  entry = teach_cache.entry_dir(cache, teach_cache.key(cfg, first))
  assert "reused_from" not in taught and reused["reused_from"] == entry
  assert reused["checkpoint"] == os.path.join(second, "teach", teach.CHECKPOINT)
  assert reused["last_train_metrics"] == taught["last_train_metrics"]
  a, b = _params(taught["checkpoint"]), _params(reused["checkpoint"])
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  assert common.foundation_checkpoint(cfg, second) == reused["checkpoint"]
  # Another recipe, or other code, is another F.
  other = _config(".*")
  other.teach.steps = 3
  assert teach_cache.key(other, first) != teach_cache.key(cfg, first)
  package = tmp_path / "package"
  (package / "stages").mkdir(parents=True)
  (package / "stages" / "teach.py").write_text("x = 1\n")
  before = teach_cache.code_digest(str(package))
  (package / "stages" / "teach.py").write_text("x = 2\n")
  assert teach_cache.code_digest(str(package)) != before
