"""Jitted KV-cache decoding and candidate scoring for the Flax Qwen2.5-VL and Qwen3-VL models.

Two jitted functions per batch shape:
  * prefill: the prompt (with its images: vision tower + image-token scatter, exactly as the model's forward) fills
    a KV cache and gives the logits of the first new token;
  * decode: the whole loop (sample, record, one cached decoder step) in one `lax.while_loop`, the cache donated.
Prompts are left padded to a length bucket, and the cache holds bucket + max_new_tokens slots, so a few
compilations serve every prompt length. New tokens continue the positions at max(prompt positions) + 1 per row,
which is transformers' rope_deltas rule for M-RoPE and plain counting for sequential positions.

`Sampler` is the user API: host numpy in (as the HF processor returns it), tokens / log-probs / lengths out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh

from recall_jax import parallel
from recall_jax.generate import kv_cache
from recall_jax.generate.sampling import GREEDY, SamplingConfig, sample


@struct.dataclass
class GenerateOutput:
  tokens: jax.Array  # (B, max_new_tokens) int32; pad_id after a row's EOS
  log_probs: jax.Array  # (B, max_new_tokens) fp32 log-softmax of the raw logits at the chosen token; 0 after EOS
  lengths: jax.Array  # (B,) int32 new tokens per row, its EOS included
  logits: jax.Array | None = None  # (B, max_new_tokens, V) fp32 raw logits per step, when asked for


@struct.dataclass
class ScoreOutput:
  logits: jax.Array  # (B, C) fp32 raw logits of the candidate tokens at the answer position
  log_probs: jax.Array  # (B, C) fp32 log-softmax over the candidates only


def next_positions(position_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """(B,) position of the first new token: max over the prompt's valid positions (all three streams) + 1."""
  valid = attention_mask.astype(bool)[None]
  return (jnp.max(jnp.where(valid, position_ids, -1), axis=(0, 2)) + 1).astype(jnp.int32)


def _prefill(graphdef: nnx.GraphDef, state: nnx.State, inputs: dict[str, Any], cache_length: int,
             mesh: Mesh | None = None) -> tuple[jax.Array, kv_cache.KVCache, jax.Array]:
  model = nnx.merge(graphdef, state)
  lm = model.language_model
  cache = kv_cache.init(model.cfg.text, inputs["input_ids"].shape[0], cache_length, lm.dtype)
  if mesh is not None:  # the cache's rows live with their batch rows; the decode loop keeps that layout
    cache = parallel.constrain_batch(cache, mesh)
  hidden, cache = model.hidden_states(inputs, cache=cache)
  logits = model.logits(hidden[:, -1]).astype(jnp.float32)
  return logits, cache, next_positions(inputs["position_ids"], inputs["attention_mask"])


jitted_prefill = jax.jit(_prefill, static_argnums=(0, 3, 4))


def _decode(graphdef: nnx.GraphDef, state: nnx.State, cache: kv_cache.KVCache, logits: jax.Array,
            positions: jax.Array, rng: jax.Array, eos_ids: jax.Array, pad_id: jax.Array, *, max_new_tokens: int,
            sampling: SamplingConfig, return_logits: bool) -> tuple[GenerateOutput, kv_cache.KVCache]:
  """The decode loop. Iteration n samples token n from the carried logits, then runs it through the decoder
  (the cache's next slot, prompt length + n; position positions + n) to get the logits of token n + 1. The final
  cache is returned so the donated input cache can be updated in place."""
  model = nnx.merge(graphdef, state)
  lm = model.language_model
  batch = logits.shape[0]
  new_token = jnp.ones((batch, 1), jnp.int32)  # the attention mask of one real token per row

  def step(carry):
    n = carry["n"]
    logits = carry["logits"]
    done = carry["done"]
    token = sample(logits, sampling, jax.random.fold_in(rng, n))
    log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
    token = jnp.where(done, pad_id, token)
    out = dict(carry)
    out["tokens"] = carry["tokens"].at[:, n].set(token)
    out["log_probs"] = carry["log_probs"].at[:, n].set(jnp.where(done, 0.0, log_prob))
    out["lengths"] = carry["lengths"] + (~done).astype(jnp.int32)
    out["done"] = done | jnp.isin(token, eos_ids)
    if return_logits:
      out["all_logits"] = carry["all_logits"].at[:, n].set(logits)
    position_ids = jnp.broadcast_to((positions + n)[None, :, None], (3, batch, 1))
    hidden, out["cache"] = lm(lm.embed_tokens(token[:, None]), position_ids, new_token, cache=carry["cache"])
    out["logits"] = model.logits(hidden[:, 0]).astype(jnp.float32)
    out["n"] = n + 1
    return out

  def keep_going(carry):
    return (carry["n"] < max_new_tokens) & ~jnp.all(carry["done"])

  carry = {
      "n": jnp.zeros((), jnp.int32),
      "cache": cache,
      "logits": logits,
      "done": jnp.zeros((batch,), bool),
      "tokens": jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
      "log_probs": jnp.zeros((batch, max_new_tokens), jnp.float32),
      "lengths": jnp.zeros((batch,), jnp.int32),
  }
  if return_logits:
    carry["all_logits"] = jnp.zeros((batch, max_new_tokens, logits.shape[-1]), jnp.float32)
  carry = jax.lax.while_loop(keep_going, step, carry)
  output = GenerateOutput(tokens=carry["tokens"], log_probs=carry["log_probs"], lengths=carry["lengths"],
                          logits=carry.get("all_logits"))
  return output, carry["cache"]


jitted_decode = jax.jit(_decode, static_argnums=0, donate_argnums=2,
                        static_argnames=("max_new_tokens", "sampling", "return_logits"))


def _score(graphdef: nnx.GraphDef, state: nnx.State, inputs: dict[str, Any], candidate_ids: jax.Array) -> ScoreOutput:
  model = nnx.merge(graphdef, state)
  hidden = model.hidden_states(inputs)
  logits = model.logits(hidden[:, -1]).astype(jnp.float32)[:, candidate_ids]
  return ScoreOutput(logits=logits, log_probs=jax.nn.log_softmax(logits, axis=-1))


jitted_score = jax.jit(_score, static_argnums=0)


def bucket_length(length: int, buckets: Sequence[int] | None) -> int:
  """The smallest bucket >= length; with no buckets, the next power of two (at least 16)."""
  if buckets is None:
    return max(16, 1 << (length - 1).bit_length())
  fitting = [b for b in sorted(buckets) if b >= length]
  if not fitting:
    raise ValueError(f"prompt length {length} exceeds the largest cache bucket {max(buckets)} "
                     f"(cache_buckets={sorted(buckets)})")
  return fitting[0]


def left_pad(input_ids: np.ndarray, attention_mask: np.ndarray, length: int,
             pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Adds padding on the left up to `length` columns."""
  extra = length - input_ids.shape[1]
  return (np.pad(input_ids, ((0, 0), (extra, 0)), constant_values=pad_id),
          np.pad(attention_mask, ((0, 0), (extra, 0)), constant_values=0))


def check_left_padded(attention_mask: np.ndarray) -> None:
  """Every row must be 0...0 1...1 with at least one real token (the last column is each row's last token)."""
  mask = np.asarray(attention_mask).astype(bool)
  if mask.ndim != 2:
    raise ValueError(f"attention_mask must be (batch, length), got shape {mask.shape}")
  bad = np.flatnonzero(~mask[:, -1] | np.any(mask[:, :-1] & ~mask[:, 1:], axis=1))
  if bad.size:
    raise ValueError(f"attention_mask rows {bad.tolist()} are not left padded (padding must come first and each "
                     "row must end with a real token)")


class Sampler:
  """Generation and candidate scoring for a model of either family (Qwen25VLModel, Qwen3VLModel).

  tokenizer: optional HF tokenizer; it supplies the defaults of pad_id and eos_ids (its eos token and
  <|endoftext|>) and lets `decode_text` work.
  eos_ids: one or several ids that end a row. pad_id: what finished rows emit and what prompts are padded with.
  cache_buckets: allowed padded prompt lengths (default: powers of two from 16); the cache holds the prompt
  bucket + max_new_tokens slots, so each (batch, bucket, max_new_tokens, sampling) compiles once.
  mesh: shard every batch, and with it the KV cache, over the mesh's batch axes (the model's weights must be on
  that mesh: `parallel.place_params`); every process passes the whole batch and gets every row back. A batch that
  does not divide into the batch shards is filled with blank rows, whose outputs are dropped.
  """

  def __init__(self, model, tokenizer: Any = None, *, eos_ids: int | Sequence[int] | None = None,
               pad_id: int | None = None, cache_buckets: Sequence[int] | None = None, mesh: Mesh | None = None):
    self.model = model
    self.mesh = mesh
    self.tokenizer = tokenizer
    if eos_ids is None and tokenizer is not None and tokenizer.eos_token_id is not None:
      # As Qwen2.5-VL-Instruct's generation_config: the chat turn end (<|im_end|>) and <|endoftext|>.
      eos_ids = [tokenizer.eos_token_id]
      end_of_text = tokenizer.get_vocab().get("<|endoftext|>")
      if end_of_text is not None and end_of_text != tokenizer.eos_token_id:
        eos_ids.append(end_of_text)
    if pad_id is None and tokenizer is not None:
      pad_id = tokenizer.pad_token_id
    if eos_ids is None or pad_id is None:
      raise ValueError("Sampler needs eos_ids and pad_id (given, or from a tokenizer with eos / pad tokens)")
    self.eos_ids = tuple(int(i) for i in np.atleast_1d(eos_ids))
    if not self.eos_ids:
      raise ValueError("Sampler eos_ids is empty")
    self.pad_id = int(pad_id)
    if cache_buckets is not None and (not cache_buckets or min(cache_buckets) < 1):
      raise ValueError(f"Sampler cache_buckets must be positive lengths, got {cache_buckets}")
    self.cache_buckets = None if cache_buckets is None else tuple(sorted(int(b) for b in cache_buckets))

  def _prepare(self, input_ids: np.ndarray, attention_mask: np.ndarray | None, pixel_values: np.ndarray | None,
               image_grid_thw: np.ndarray | None) -> dict[str, Any]:
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
    attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    if attention_mask.shape != input_ids.shape:
      raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
    if (image_grid_thw is None) != (pixel_values is None):
      raise ValueError("pixel_values and image_grid_thw must be given together")
    check_left_padded(attention_mask)
    length = bucket_length(input_ids.shape[1], self.cache_buckets)
    input_ids, attention_mask = left_pad(input_ids, attention_mask, length, self.pad_id)
    if self.mesh is not None:
      input_ids, attention_mask = self._fill_shards(input_ids, attention_mask)
    inputs = self.model.prepare(input_ids, attention_mask, image_grid_thw, pixel_values)
    if self.mesh is None:
      return inputs
    # Packed patches of images of any size are not batch-first: replicated, like their geometry.
    return parallel.host_to_global(inputs, self.mesh, batch_axes={"position_ids": 1}, global_rows=len(input_ids),
                                   replicate=("vision", "pixel_values"))

  def _fill_shards(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows appended up to a multiple of the mesh's batch shards, so any batch size decodes on any mesh: each is
    one attended pad token and no image (rows are independent; `_rows` drops their outputs)."""
    extra = -len(input_ids) % parallel.batch_shards(self.mesh)
    if not extra:
      return input_ids, attention_mask
    fill_ids = np.full((extra, input_ids.shape[1]), self.pad_id, input_ids.dtype)
    fill_mask = np.zeros((extra, input_ids.shape[1]), attention_mask.dtype)
    fill_mask[:, -1] = 1
    return np.concatenate([input_ids, fill_ids]), np.concatenate([attention_mask, fill_mask])

  @staticmethod
  def _rows(output, n: int):
    """`output` (batch-first arrays) without the rows `_fill_shards` appended."""
    return jax.tree.map(lambda x: x if x.shape[0] == n else x[:n], output)

  def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
               pixel_values: np.ndarray | None = None, image_grid_thw: np.ndarray | None = None, *,
               max_new_tokens: int, sampling: SamplingConfig = GREEDY, rng: jax.Array | None = None,
               return_logits: bool = False) -> GenerateOutput:
    """Continues each left-padded prompt by up to max_new_tokens tokens (fewer when every row hit EOS; the
    rest is pad_id). rng (a jax PRNG key) is required unless sampling is greedy."""
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if rng is None:
      if not sampling.greedy:
        raise ValueError(f"sampling {sampling} draws random tokens: pass rng=jax.random.key(seed)")
      rng = jax.random.key(0)
    inputs = self._prepare(input_ids, attention_mask, pixel_values, image_grid_thw)
    graphdef, state = nnx.split(self.model)
    cache_length = inputs["input_ids"].shape[1] + max_new_tokens
    logits, cache, positions = parallel.settle(jitted_prefill(graphdef, state, inputs, cache_length, self.mesh))
    output, _ = jitted_decode(graphdef, state, cache, logits, positions, rng, np.asarray(self.eos_ids, np.int32),
                              np.int32(self.pad_id), max_new_tokens=max_new_tokens, sampling=sampling,
                              return_logits=return_logits)
    return self._rows(parallel.addressable(parallel.settle(output)), len(input_ids))

  def score_candidates(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                       pixel_values: np.ndarray | None = None, image_grid_thw: np.ndarray | None = None, *,
                       candidate_ids: Sequence[int]) -> ScoreOutput:
    """Logits of `candidate_ids` for the token right after each prompt (e.g. the ids of "no" / "yes")."""
    candidates = np.asarray(candidate_ids, np.int32)
    vocab = self.model.cfg.text.vocab_size
    if candidates.ndim != 1 or candidates.size == 0 or candidates.min() < 0 or candidates.max() >= vocab:
      raise ValueError(f"candidate_ids must be a non-empty list of ids in [0, {vocab}), got {candidate_ids}")
    inputs = self._prepare(input_ids, attention_mask, pixel_values, image_grid_thw)
    graphdef, state = nnx.split(self.model)
    return self._rows(parallel.addressable(parallel.settle(jitted_score(graphdef, state, inputs, candidates))),
                      len(input_ids))

  def decode_text(self, output: GenerateOutput, skip_special_tokens: bool = True) -> list[str]:
    """The generated texts, each cut at its length (its EOS included, then dropped as a special token)."""
    if self.tokenizer is None:
      raise ValueError("Sampler.decode_text needs the Sampler to be built with a tokenizer")
    tokens, lengths = np.asarray(output.tokens), np.asarray(output.lengths)
    return [self.tokenizer.decode(row[:n].tolist(), skip_special_tokens=skip_special_tokens)
            for row, n in zip(tokens, lengths)]
