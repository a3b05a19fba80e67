"""Jitted KV-cache decoding against transformers' generate and the model's own full forward, on tiny random
checkpoints (tests/models/qwen2_5_vl/reference.py)."""

import jax
import numpy as np
import pytest
import torch

from recall_jax.generate import GREEDY, GenerateOutput, Sampler, SamplingConfig
from recall_jax.generate.sampling import filter_logits, sample
from recall_jax.train.compiles import CompileCounter
from recall_jax.models.qwen2_5_vl import from_pretrained, tiny_config
from recall_jax.models.qwen2_5_vl.tiny_tokenizer import TINY_TOKEN_IDS, build_tiny_tokenizer
from tests.models.qwen2_5_vl import reference as ref

PAD = ref.PAD_TOKEN_ID
NEW = 6  # max_new_tokens, shared by most tests so their compilations are shared too
BATCHES = {
    "text": [[7], [11], [3]],
    # Row 0: two images of different sizes; row 1: one image; row 2: text only. All left padded.
    "two_images": [[5, (1, 8, 12), 3, (1, 10, 6), 4], [3, (1, 12, 8), 2], [6]],
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  cfg = tiny_config()
  directory = str(tmp_path_factory.mktemp("ckpt"))
  hf = ref.save_reference(cfg, directory)
  return cfg, directory, hf, from_pretrained(directory)


def hf_generate(hf, batch, max_new_tokens, eos_ids, mrope=True):
  """transformers greedy generate -> (new tokens, per-step raw logits), padded to max_new_tokens with PAD / NaN
  (it stops once every row has ended)."""
  kwargs = {k: torch.from_numpy(v) for k, v in batch.items()}
  if mrope and "image_grid_thw" in batch:
    # Without mm_token_type_ids transformers 5.23 silently falls back to 1-D positions.
    kwargs["mm_token_type_ids"] = (kwargs["input_ids"] == hf.config.image_token_id).int()
  hf.model.rope_deltas = None
  out = hf.generate(**kwargs, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=PAD,
                    eos_token_id=eos_ids, output_logits=True, return_dict_in_generate=True)
  tokens = out.sequences.numpy()[:, batch["input_ids"].shape[1]:]
  logits = torch.stack(out.logits, dim=1).float().numpy()
  missing = max_new_tokens - tokens.shape[1]
  return (np.pad(tokens, ((0, 0), (0, missing)), constant_values=PAD),
          np.pad(logits, ((0, 0), (0, missing), (0, 0)), constant_values=np.nan))


LOGIT_RTOL = 1e-5  # of the logits' scale: fp32 noise between programs (positions off by one would show as ~1e-3)


def assert_step_logits_close(got, want, lengths):
  """Per-step logits of the steps each row really generated."""
  live = np.arange(got.shape[1]) < lengths[:, None]
  np.testing.assert_allclose(got[live], want[live], rtol=0, atol=LOGIT_RTOL * np.abs(want[live]).max())


def assert_argmax_well_posed(logits):
  """Greedy tokens of two programs are comparable exactly only where the reference's top two logits are further
  apart than the logit tolerance; checks that for the steps compared ((steps, vocab); NaN steps skipped)."""
  logits = logits[np.isfinite(logits).all(-1)]
  top2 = np.sort(logits, axis=-1)[:, -2:]
  gap, tol = (top2[:, 1] - top2[:, 0]).min(), LOGIT_RTOL * np.abs(logits).max()
  assert gap > 10 * tol, f"top-2 gap {gap:.3g} is within 10x the logit tolerance {tol:.3g}: pick other test data"


def expected_lengths(tokens, eos_ids):
  is_eos = np.isin(tokens, eos_ids)
  return np.where(is_eos.any(1), is_eos.argmax(1) + 1, tokens.shape[1])


def generate(sampler, batch, **kw):
  return sampler.generate(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                          batch.get("image_grid_thw"), **kw)


@pytest.mark.parametrize("rows", list(BATCHES), ids=list(BATCHES))
def test_greedy_matches_transformers_generate(checkpoint, rows):
  cfg, _, hf, model = checkpoint
  batch = ref.make_batch(cfg, BATCHES[rows], seed=1)
  # Two EOS ids that really fire: the tokens transformers picks for row 0 at step 2 and row 1 at step 4.
  free, _ = hf_generate(hf, batch, NEW, eos_ids=None)
  eos = sorted({int(free[0, 2]), int(free[1, 4])})
  want, want_logits = hf_generate(hf, batch, NEW, eos_ids=eos)
  assert_argmax_well_posed(want_logits[np.arange(NEW) < expected_lengths(want, eos)[:, None]])
  out = generate(Sampler(model, eos_ids=eos, pad_id=PAD), batch, max_new_tokens=NEW, return_logits=True)
  np.testing.assert_array_equal(np.asarray(out.tokens), want)
  lengths = np.asarray(out.lengths)
  np.testing.assert_array_equal(lengths, expected_lengths(want, eos))
  assert lengths[0] <= 3 and lengths.min() < NEW
  assert_step_logits_close(np.asarray(out.logits), want_logits, lengths)
  log_probs = np.asarray(out.log_probs)
  assert np.all(log_probs[np.arange(NEW) >= lengths[:, None]] == 0)
  assert np.all(log_probs[np.arange(NEW) < lengths[:, None]] < 0)


def test_sequential_positions_match_transformers_without_mm_token_type_ids(checkpoint):
  cfg, directory, hf, mrope_model = checkpoint
  model = from_pretrained(directory, position_mode="sequential")
  batch = ref.make_batch(cfg, BATCHES["two_images"], seed=2)
  want, want_logits = hf_generate(hf, batch, NEW, eos_ids=[-1], mrope=False)
  assert_argmax_well_posed(want_logits.reshape(-1, want_logits.shape[-1]))
  out = generate(Sampler(model, eos_ids=[-1], pad_id=PAD), batch, max_new_tokens=NEW, return_logits=True)
  np.testing.assert_array_equal(np.asarray(out.tokens), want)
  assert_step_logits_close(np.asarray(out.logits), want_logits, np.full(3, NEW))
  # The image rows' logits really depend on the position mode, so the comparison above can tell them apart.
  mrope = generate(Sampler(mrope_model, eos_ids=[-1], pad_id=PAD), batch, max_new_tokens=NEW, return_logits=True)
  gap = np.abs(np.asarray(mrope.logits) - np.asarray(out.logits))[:2]
  assert gap.max() > 100 * 1e-5 * np.abs(want_logits).max()


def test_cached_step_logits_equal_full_forward(checkpoint):
  cfg, _, _, model = checkpoint
  batch = ref.make_batch(cfg, BATCHES["two_images"], seed=3)
  out = generate(Sampler(model, eos_ids=[-1], pad_id=PAD), batch, max_new_tokens=NEW, return_logits=True)
  tokens, step_logits = np.asarray(out.tokens), np.asarray(out.logits)
  np.testing.assert_array_equal(np.asarray(out.lengths), NEW)
  # The prompt plus every generated token but the last, without a cache.
  full = dict(batch)
  full["input_ids"] = np.concatenate([batch["input_ids"], tokens[:, :-1]], axis=1)
  full["attention_mask"] = np.concatenate([batch["attention_mask"], np.ones_like(tokens[:, :-1])], axis=1)
  prompt_length = batch["input_ids"].shape[1]
  want = np.asarray(model(**full).logits)[:, prompt_length - 1:]
  assert step_logits.shape == want.shape == (3, NEW, cfg.text.vocab_size)
  np.testing.assert_allclose(step_logits, want, rtol=0, atol=LOGIT_RTOL * np.abs(want).max())
  assert_argmax_well_posed(want.reshape(-1, want.shape[-1]))
  np.testing.assert_array_equal(tokens, want.argmax(-1))
  chosen = np.take_along_axis(jax.nn.log_softmax(want, axis=-1), tokens[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(np.asarray(out.log_probs), chosen, atol=1e-5)


def test_decode_compiles_once_per_batch_and_bucket(checkpoint):
  """Counted with jax.monitoring's lowering events (train/compiles.py): prompts in a cache bucket seen before lower
  nothing; a new bucket lowers its prefill and decode loop again."""
  cfg, _, _, model = checkpoint
  sampler = Sampler(model, eos_ids=[-1], pad_id=PAD, cache_buckets=[16, 32])
  with CompileCounter() as counter:
    def lowered(lengths, seed=0):
      before = counter.count
      with counter.counting():
        generate(sampler, ref.make_batch(cfg, [[n] for n in lengths], seed=seed), max_new_tokens=4)
      return counter.count - before
    assert lowered([5, 2]) >= 2  # bucket 16's prefill and decode loop (and once per process, the rng's seeding)
    assert [lowered([9, 6], seed=1), lowered([16, 13], seed=2)] == [0, 0]  # all in bucket 16
    assert lowered([20, 2]) == 2  # bucket 32: its prefill and decode loop
    assert lowered([7, 3], seed=3) == 0
  with pytest.raises(ValueError, match="prompt length 33 exceeds the largest cache bucket 32"):
    generate(sampler, ref.make_batch(cfg, [[33]]), max_new_tokens=4)


def test_sampling_keys_and_top_k_one(checkpoint):
  cfg, _, _, model = checkpoint
  sampler = Sampler(model, eos_ids=[-1], pad_id=PAD)
  batch = ref.make_batch(cfg, BATCHES["text"], seed=4)
  hot = SamplingConfig(temperature=2.0, top_p=0.95)
  a = generate(sampler, batch, max_new_tokens=NEW, sampling=hot, rng=jax.random.key(1))
  b = generate(sampler, batch, max_new_tokens=NEW, sampling=hot, rng=jax.random.key(1))
  c = generate(sampler, batch, max_new_tokens=NEW, sampling=hot, rng=jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  np.testing.assert_array_equal(np.asarray(a.log_probs), np.asarray(b.log_probs))
  assert np.any(np.asarray(a.tokens) != np.asarray(c.tokens))
  greedy = generate(sampler, batch, max_new_tokens=NEW)
  top1 = generate(sampler, batch, max_new_tokens=NEW, sampling=SamplingConfig(temperature=2.0, top_k=1),
                  rng=jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(top1.tokens), np.asarray(greedy.tokens))
  # Log-probs are under the unmodified softmax, whatever the sampling filters.
  # (two programs: equal up to fp32 noise; a filtered or tempered softmax would be off by O(1))
  want = np.asarray(greedy.log_probs)
  np.testing.assert_allclose(np.asarray(top1.log_probs), want, rtol=0, atol=LOGIT_RTOL * np.abs(want).max())
  with pytest.raises(ValueError, match="pass rng"):
    generate(sampler, batch, max_new_tokens=NEW, sampling=hot)


def test_filters_keep_top_k_and_nucleus():
  probs = np.array([[0.15, 0.5, 0.05, 0.3]], np.float32)
  logits = np.log(probs)
  neg = filter_logits(logits, SamplingConfig(temperature=1.0, top_k=2)) < -1e30
  np.testing.assert_array_equal(neg, [[True, False, True, False]])
  # Nucleus 0.7: 0.5 alone is short of it, 0.5 + 0.3 reaches it, so exactly tokens 1 and 3 stay.
  cfg = SamplingConfig(temperature=1.0, top_p=0.7)
  neg = filter_logits(logits, cfg) < -1e30
  np.testing.assert_array_equal(neg, [[True, False, True, False]])
  draws = np.asarray(jax.vmap(lambda k: sample(logits, cfg, k))(jax.random.split(jax.random.key(0), 4000)))
  assert set(np.unique(draws)) == {1, 3}
  assert abs(np.mean(draws == 1) - 0.5 / 0.8) < 0.03
  np.testing.assert_array_equal(np.asarray(sample(logits, GREEDY, None)), [1])
  with pytest.raises(ValueError, match="top_p must be in"):
    SamplingConfig(temperature=1.0, top_p=0.0)


def test_score_candidates_match_transformers_last_position(checkpoint):
  cfg, _, hf, model = checkpoint
  batch = ref.make_batch(cfg, [[4, (1, 8, 8), 3], [2, (1, 8, 8), 9]], seed=5)
  candidates = [10, 300, 42]
  got = Sampler(model, eos_ids=[-1], pad_id=PAD).score_candidates(
      batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"],
      candidate_ids=candidates)
  want = ref.reference_forward(hf, batch)["logits"][:, -1, candidates]
  np.testing.assert_allclose(np.asarray(got.logits), want, rtol=0, atol=1e-4 * np.abs(want).max())
  np.testing.assert_allclose(np.asarray(got.log_probs), np.asarray(jax.nn.log_softmax(want, axis=-1)), atol=1e-4)


def test_rejects_bad_inputs(checkpoint):
  cfg, _, _, model = checkpoint
  sampler = Sampler(model, eos_ids=[-1], pad_id=PAD)
  batch = ref.make_batch(cfg, [[4, (1, 8, 8), 3], [2, (1, 8, 8), 9]])
  right_padded = batch["attention_mask"][:, ::-1]
  with pytest.raises(ValueError, match=r"rows \[0\] are not left padded"):
    sampler.generate(batch["input_ids"], right_padded, batch["pixel_values"], batch["image_grid_thw"],
                     max_new_tokens=2)
  with pytest.raises(ValueError, match="must be given together"):
    sampler.generate(batch["input_ids"], batch["attention_mask"], None, batch["image_grid_thw"], max_new_tokens=2)
  with pytest.raises(ValueError, match="candidate_ids"):
    sampler.score_candidates(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                             batch["image_grid_thw"], candidate_ids=[cfg.text.vocab_size])
  with pytest.raises(ValueError, match="needs eos_ids and pad_id"):
    Sampler(model)


def test_tokenizer_defaults_and_decode_text(checkpoint):
  model = checkpoint[3]
  tokenizer = build_tiny_tokenizer()
  sampler = Sampler(model, tokenizer)
  im_end, end_of_text = TINY_TOKEN_IDS["<|im_end|>"], TINY_TOKEN_IDS["<|endoftext|>"]
  assert sampler.eos_ids == (im_end, end_of_text) and sampler.pad_id == end_of_text
  words = [tokenizer.encode("a red dress"), tokenizer.encode("no")]
  tokens = np.full((2, 8), end_of_text, np.int32)
  tokens[0, :len(words[0])] = words[0]
  tokens[0, len(words[0])] = im_end
  tokens[1, :len(words[1])] = words[1]
  tokens[1, len(words[1]):] = 65  # past the row's length: must not be decoded
  output = GenerateOutput(tokens=tokens, log_probs=np.zeros((2, 8), np.float32),
                          lengths=np.array([len(words[0]) + 1, len(words[1])], np.int32))
  assert sampler.decode_text(output) == ["a red dress", "no"]


def test_a_batch_that_does_not_divide_into_the_mesh_is_filled_and_its_rows_equal_one_device(checkpoint):
  from recall_jax import parallel
  cfg, directory, _, model = checkpoint
  mesh = parallel.make_mesh((-1, 1, 1))
  assert parallel.batch_shards(mesh) == 8
  batch = ref.make_batch(cfg, BATCHES["two_images"], seed=1)  # 3 rows
  sharded = Sampler(from_pretrained(directory, mesh=mesh), eos_ids=[-1], pad_id=PAD, mesh=mesh)
  single = Sampler(model, eos_ids=[-1], pad_id=PAD)
  got, want = (generate(s, batch, max_new_tokens=NEW, return_logits=True) for s in (sharded, single))
  assert got.tokens.shape == want.tokens.shape == (3, NEW)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  assert_step_logits_close(np.asarray(got.logits), np.asarray(want.logits), np.asarray(want.lengths))
  scores = [s.score_candidates(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                               batch["image_grid_thw"], candidate_ids=[10, 300]) for s in (sharded, single)]
  assert scores[0].logits.shape == (3, 2)
  np.testing.assert_allclose(np.asarray(scores[0].logits), np.asarray(scores[1].logits), rtol=0,
                             atol=LOGIT_RTOL * np.abs(np.asarray(scores[1].logits)).max())
