"""The embedding model: last-token pooling for both paddings, and the user API equals the model's own forward."""

import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from recall_jax import embed, parallel
from recall_jax.models import embedding
from recall_jax.data import pipeline, prompts
from recall_jax.data.image import ImageBuckets
from recall_jax.models import qwen2_5_vl
from recall_jax.models.qwen2_5_vl.tiny_tokenizer import build_tiny_tokenizer


def test_pool_last_token_left_and_right_padding():
  hidden = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
  left = jnp.array([[0, 1, 1, 1], [0, 0, 1, 1]])
  right = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]])
  np.testing.assert_array_equal(embedding.pool_last_token(hidden, left), hidden[:, 3])
  np.testing.assert_array_equal(embedding.pool_last_token(hidden, right), jnp.stack([hidden[0, 2], hidden[1, 1]]))


def _images(n, seed=0):
  rng = np.random.default_rng(seed)
  return [Image.fromarray(rng.integers(0, 255, (60 + 10 * i, 80, 3), dtype=np.uint8)) for i in range(n)]


def test_embedder_matches_model_forward_at_the_appended_token():
  model = qwen2_5_vl.Qwen25VLModel(qwen2_5_vl.tiny_config(), rngs=nnx.Rngs(0))
  tok = build_tiny_tokenizer()
  enc = pipeline.EncodeConfig(image_buckets=ImageBuckets.square(56), query_lengths=(256,), target_lengths=(128,))
  embedder = embed.Embedder(model, tok, dataset="cirr", encode=enc, batch_size=2)
  images = _images(3)
  texts = ["make it red", "is striped with long sleeves", "has no sleeves"]
  got = embedder.embed_queries(images, texts)
  assert got.shape == (3, 64) and got.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)

  # Reference: one prompt at a time, no padding, through the model's public __call__.
  for i, (image, text) in enumerate(zip(images, texts)):
    pixels, grid = pipeline.encode_images([image], enc)
    prompt = prompts.expand_image_pads(prompts.query_prompt("cirr", (text,)), [int(np.prod(grid[0])) // 4])
    ids = np.asarray([tok(prompt)["input_ids"]])
    assert ids[0, -1] == tok.convert_tokens_to_ids("<|endoftext|>")
    out = model(input_ids=ids, pixel_values=pixels[0], image_grid_thw=grid)
    want = np.asarray(out.hidden_states[0, -1])
    np.testing.assert_allclose(got[i], want / np.linalg.norm(want), atol=2e-5)

  gallery = embedder.embed_targets(images)
  idx, scores = embedder.search(gallery[:2], gallery, k=3)
  assert list(idx[:, 0]) == [0, 1] and np.allclose(scores[:, 0], 1.0, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# Adapters that carry their preprocessing: a real adapt + evaluate run on the tiny world (bf16 base, 56 px buckets,
# the tiny config's 320 / 128 token buckets), then the Embedder built from the adapter directory alone.

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from configs import tiny  # noqa: E402
from recall_jax import main, recall_config  # noqa: E402
from recall_jax.eval import embeddings  # noqa: E402
from recall_jax.stages import common  # noqa: E402


def _run_config():
  cfg = tiny.get_config()
  cfg.world.image_size = 56
  cfg.data.image_buckets = 56
  cfg.data.dataset = "cirr"
  cfg.model.dtype = "bfloat16"  # not the Embedder's fp32 of old: the file must carry it
  cfg.train.steps = 2
  cfg.train.global_batch_size = 8  # one example per test device
  cfg.train.log_every = cfg.train.checkpoint_every = 2
  cfg.train.data_threads = 1
  cfg.train.best_metric = ""
  cfg.lora.rank = 4
  cfg.optim.lr = 1e-2
  cfg.eval.batch_size = 8
  cfg.eval.sheet_queries = 1
  cfg.eval.foundation_verification = False
  return cfg


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
  """(workdir, adapter dir, val split) after prepare, adapt and evaluate on the tiny world."""
  workdir = str(tmp_path_factory.mktemp("embed_run"))
  cfg = _run_config()
  out = main.run(cfg, workdir, ["prepare", "adapt", "evaluate"])
  return workdir, out["adapt"]["adapter_dir"], common.read_splits(cfg, workdir, "val")[0]


def test_adapt_writes_the_preprocessing_beside_the_adapters(adapted):
  workdir, adapter_dir, _ = adapted
  written = json.load(open(os.path.join(adapter_dir, recall_config.FILENAME)))
  assert (written["dtype"], written["dataset"], written["stage"]) == ("bfloat16", "cirr", "adapt")
  assert written["encode"]["image_buckets"] == [[56, 56]]
  assert (written["encode"]["query_lengths"], written["encode"]["target_lengths"]) == ([320], [128])
  assert written["base_checkpoint"] == os.path.abspath(os.path.join(workdir, "prepare", "checkpoint"))
  assert written["prompts"]["target_instruction"] == prompts.TARGET_INSTRUCTION


def test_from_pretrained_embeds_exactly_as_the_evaluate_stage(adapted):
  workdir, adapter_dir, split = adapted
  # On the run's mesh: batches split as the stage split them (bf16 sums depend on the per-device batch).
  embedder = embed.Embedder.from_pretrained(adapter_dir, mesh=parallel.mesh_from_config(_run_config()))
  q = embedder.embed_queries([split.images[x.reference] for x in split.queries], [], captions=[
      x.captions for x in split.queries])
  g = embedder.embed_targets([split.images[name] for name in split.gallery])
  ranks = json.load(open(os.path.join(workdir, "evaluate", "baseline", "ranks_cirr.json")))
  assert embeddings.fingerprint(q, g) == ranks["embedding_fingerprint"]
  # The file's dtype is what made them: the same adapters on an fp32 base embed differently.
  fp32 = embed.Embedder.from_pretrained(adapter_dir, dtype="float32")
  assert embeddings.fingerprint(fp32.embed_targets([split.images[n] for n in split.gallery[:2]])) != \
      embeddings.fingerprint(g[:2])


def test_from_pretrained_without_or_with_a_bad_recall_config_names_file_and_key(adapted, tmp_path):
  workdir, adapter_dir, _ = adapted
  bare = str(tmp_path / "bare")
  shutil.copytree(adapter_dir, bare)
  os.remove(os.path.join(bare, recall_config.FILENAME))
  with pytest.raises(FileNotFoundError, match=f"{bare}/recall_config.json is missing"):
    embed.Embedder.from_pretrained(bare)
  with pytest.raises(FileNotFoundError, match="is it a base checkpoint"):
    embed.Embedder.from_pretrained(os.path.join(workdir, "prepare", "checkpoint"))
  good = json.load(open(os.path.join(adapter_dir, recall_config.FILENAME)))
  for edit, message in [(lambda d: d.pop("encode"), "missing key 'encode'"),
                        (lambda d: d["encode"].pop("query_lengths"), "missing key 'encode.query_lengths'"),
                        (lambda d: d.update(dtype="float16"), "key 'dtype' must be one of"),
                        (lambda d: d["prompts"].update(target_instruction="x"), "key 'prompts.target_instruction'")]:
    bad = json.loads(json.dumps(good))
    edit(bad)
    json.dump(bad, open(os.path.join(bare, recall_config.FILENAME), "w"))
    with pytest.raises(ValueError, match=f"{bare}/recall_config.json: .*{message}"):
      embed.Embedder.from_pretrained(bare)


def test_gallery_embeddings_are_cached_by_model_and_preprocessing(adapted, tmp_path, monkeypatch):
  _, adapter_dir, split = adapted
  paths = [split.images[name] for name in split.gallery[:6]]
  cache = str(tmp_path / "cache")
  calls = []
  real = embeddings.embed_gallery
  monkeypatch.setattr(embeddings, "embed_gallery", lambda *a, **k: calls.append(1) or real(*a, **k))
  embedder = embed.Embedder.from_pretrained(adapter_dir)
  first = embedder.embed_targets(paths, cache_dir=cache)
  again = embedder.embed_targets(paths, cache_dir=cache)
  assert len(calls) == 1 and np.array_equal(first, again)
  keys = sorted(f for f in os.listdir(cache) if f.endswith(".json"))
  assert len(keys) == 1 and json.load(open(os.path.join(cache, keys[0])))["parts"]["encode"]["image_buckets"] == [
      [56, 56]]

  changed = str(tmp_path / "changed")  # the same adapters with one weight moved
  shutil.copytree(adapter_dir, changed)
  weights = os.path.join(changed, "adapter_model.safetensors")
  tensors = load_file(weights)
  name = sorted(tensors)[0]
  tensors[name] = tensors[name] + 1.0
  save_file(tensors, weights)
  embed.Embedder.from_pretrained(changed).embed_targets(paths, cache_dir=cache)
  other_buckets = pipeline.EncodeConfig(image_buckets=ImageBuckets.square(84), query_lengths=(320,),
                                        target_lengths=(128,))
  embed.Embedder.from_pretrained(adapter_dir, encode=other_buckets).embed_targets(paths, cache_dir=cache)
  embedder.embed_targets(paths[:5], cache_dir=cache)  # another gallery
  assert len(calls) == 4 and len([f for f in os.listdir(cache) if f.endswith(".npy")]) == 4


def test_the_gallery_is_decoded_batch_by_batch(adapted, monkeypatch):
  _, adapter_dir, split = adapted
  embedder = embed.Embedder.from_pretrained(adapter_dir, batch_size=2)
  loads, at_first_step = [], []
  real_load, real_step = embed.load_image, embeddings._embed_step
  monkeypatch.setattr(embed, "load_image", lambda p: loads.append(p) or real_load(p))
  monkeypatch.setattr(embeddings, "_embed_step", lambda *a: at_first_step.append(len(loads)) or real_step(*a))
  paths = [split.images[name] for name in split.gallery]
  embedder.embed_targets(paths)
  assert len(loads) == len(paths) and len(paths) >= 16
  assert at_first_step[0] < len(paths) // 2  # the first batch is embedded before most images were read
