"""Analytic matmul FLOPs of the project's programs, from the model config and the config's shapes.

XLA's cost_analysis() counts the body of a while / scan once (GradCache's chunk loops, the decode loop), so the AOT
plan (`recall_jax.aot`) counts here instead: every matmul the program asks for (2 FLOPs per multiply-add; norms,
rotary, softmax and other elementwise work left out), with the depth, widths, lengths and segment shapes it runs at.

A tower is a list of stages; a stage is the matmuls that read one input (q, k and v; gate and up). Backward:
  * an activation's gradient is formed only where the input depends on a trained parameter (JAX differentiates
    nothing else): vision block 0 is constant up to its adapted down_proj, everything after it is not;
  * a frozen linear with a dependent input costs one matmul (the input gradient), never the weight gradient;
  * an adapted linear (LoRA / DoRA, models/lora.py) adds its A and B gradients, and with DoRA in training (active
    dropout) the base matmul runs twice, on x and on dropout(x), forward and backward;
  * attention (two activation matmuls) costs twice its forward when its inputs are dependent.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional, Sequence, Union

import numpy as np

from recall_jax.models import family as family_lib

ModelConfig = Any  # a Qwen25VLConfig or a Qwen3VLConfig (recall_jax.models.family)


@dataclasses.dataclass(frozen=True)
class Linear:
  path: str  # dotted module path, as the LoRA target regex sees it
  tokens: int
  d_in: int
  d_out: int


@dataclasses.dataclass(frozen=True)
class Attention:
  rows: int  # independent sequences (batch rows, image windows or frames)
  q_len: int
  kv_len: int
  width: int  # heads * head_dim


Op = Union[Linear, Attention]
Stage = list[Op]


@dataclasses.dataclass(frozen=True)
class Adapters:
  """The adapters of a training step: LoRA target regex (fullmatch, as lora.apply_lora), rank, DoRA, and whether
  dropout is active (training with lora.dropout > 0)."""
  regex: str
  rank: int
  dora: bool
  dropout: bool


def _adapted(op: Op, adapters: Optional[Adapters]) -> bool:
  return adapters is not None and isinstance(op, Linear) and re.fullmatch(adapters.regex, op.path) is not None


def forward(op: Op, adapters: Optional[Adapters] = None) -> int:
  if isinstance(op, Attention):
    return 4 * op.rows * op.q_len * op.kv_len * op.width  # q k^T and p v
  t, i, o = op.tokens, op.d_in, op.d_out
  flops = 2 * t * i * o
  if _adapted(op, adapters):
    r = adapters.rank
    flops += 2 * t * r * (i + o)
    if adapters.dora:
      flops += 2 * (i * r * o + r * i * r + r * r * o)  # the weight norm ||W + s A B||, once per call
      if adapters.dropout:
        flops += 2 * t * i * o  # dropout(x) W
  return flops


def backward(op: Op, dependent_input: bool, adapters: Optional[Adapters] = None) -> int:
  if isinstance(op, Attention):
    return 2 * forward(op) if dependent_input else 0
  t, i, o = op.tokens, op.d_in, op.d_out
  base_calls = 2 if _adapted(op, adapters) and adapters.dora and adapters.dropout else 1
  flops = base_calls * 2 * t * i * o if dependent_input else 0
  if _adapted(op, adapters):
    r = adapters.rank
    flops += 2 * t * o * r + 2 * t * r * o + 2 * t * i * r  # g B^T, then the B and A gradients
    if dependent_input:
      flops += 2 * t * r * i  # through A to the input
  return flops


def tower(stages: Sequence[Stage], adapters: Optional[Adapters] = None, *, dependent_input: bool = False,
          differentiate: bool = False) -> tuple[int, int, bool]:
  """(forward, backward, output dependent) of stages run in order from an input (dependent or not)."""
  fwd = bwd = 0
  dependent = dependent_input
  for stage in stages:
    fwd += sum(forward(op, adapters) for op in stage)
    if differentiate:
      bwd += sum(backward(op, dependent, adapters) for op in stage)
    dependent = dependent or any(_adapted(op, adapters) for op in stage)
  return fwd, bwd, dependent


# ---------------------------------------------------------------------------------------------------------------
# Qwen2.5-VL and Qwen3-VL


def vision_stages(cfg: ModelConfig, grid: tuple[int, int, int], images: int) -> list[Stage]:
  """The vision tower over `images` images of one grid; attention segments as its vision geometry pads them.
  Qwen2.5-VL: window / full attention, SwiGLU MLP; Qwen3-VL: full attention, fc1 -> GELU -> fc2, DeepStack mergers."""
  v = cfg.vision
  qwen3 = family_lib.of_config(cfg) is family_lib.QWEN3_VL
  geometry = family_lib.of_config(cfg).vision_geometry(np.asarray([grid] * images, np.int64), v)
  n = int(geometry["rotary_pos"].shape[0])
  h = v.hidden_size
  stages: list[Stage] = [[Linear("visual.patch_embed.proj", n, v.patch_dim, h)]]
  merged, width = n // v.spatial_merge_size**2, h * v.spatial_merge_size**2
  for i in range(v.depth):
    p = f"visual.blocks.{i}"
    full = qwen3 or i in v.fullatt_block_indexes
    segments = geometry["full_gather" if full else "window_gather"].shape
    stages += [
        [Linear(f"{p}.attn.qkv", n, h, 3 * h)],
        [Attention(int(segments[0]), int(segments[1]), int(segments[1]), h)],
        [Linear(f"{p}.attn.proj", n, h, h)],
    ]
    if qwen3:
      stages += [[Linear(f"{p}.mlp.linear_fc1", n, h, v.intermediate_size)],
                 [Linear(f"{p}.mlp.linear_fc2", n, v.intermediate_size, h)]]
      if i in v.deepstack_visual_indexes:
        j = v.deepstack_visual_indexes.index(i)
        stages += [[Linear(f"visual.deepstack_merger_list.{j}.linear_fc1", merged, width, width)],
                   [Linear(f"visual.deepstack_merger_list.{j}.linear_fc2", merged, width, v.out_hidden_size)]]
    else:
      stages += [[Linear(f"{p}.mlp.gate_proj", n, h, v.intermediate_size),
                  Linear(f"{p}.mlp.up_proj", n, h, v.intermediate_size)],
                 [Linear(f"{p}.mlp.down_proj", n, v.intermediate_size, h)]]
  names = ("linear_fc1", "linear_fc2") if qwen3 else ("mlp.0", "mlp.2")
  stages += [[Linear(f"visual.merger.{names[0]}", merged, width, width)],
             [Linear(f"visual.merger.{names[1]}", merged, width, v.out_hidden_size)]]
  return stages


def text_stages(cfg: ModelConfig, batch: int, length: int, kv_len: Optional[int] = None) -> list[Stage]:
  """The decoder over (batch, length) tokens attending over kv_len slots (the KV cache; default: length)."""
  t = cfg.text
  h, tokens = t.hidden_size, batch * length
  q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
  stages: list[Stage] = []
  for i in range(t.num_hidden_layers):
    p = f"language_model.layers.{i}"
    stages += [
        [Linear(f"{p}.self_attn.q_proj", tokens, h, q), Linear(f"{p}.self_attn.k_proj", tokens, h, kv),
         Linear(f"{p}.self_attn.v_proj", tokens, h, kv)],
        [Attention(batch, length, kv_len or length, q)],
        [Linear(f"{p}.self_attn.o_proj", tokens, q, h)],
        [Linear(f"{p}.mlp.gate_proj", tokens, h, t.intermediate_size),
         Linear(f"{p}.mlp.up_proj", tokens, h, t.intermediate_size)],
        [Linear(f"{p}.mlp.down_proj", tokens, t.intermediate_size, h)],
    ]
  return stages


def lm_head(cfg: ModelConfig, tokens: int) -> Stage:
  return [Linear("lm_head", tokens, cfg.text.hidden_size, cfg.text.vocab_size)]


def embed_side(cfg: ModelConfig, batch: int, length: int, grid: tuple[int, int, int],
               adapters: Optional[Adapters] = None, differentiate: bool = False) -> tuple[int, int]:
  """(forward, backward) of one embedding call (models/embedding.embed): one image per row, then the decoder."""
  vf, vb, dependent = tower(vision_stages(cfg, grid, batch), adapters, differentiate=differentiate)
  tf, tb, _ = tower(text_stages(cfg, batch, length), adapters, dependent_input=dependent, differentiate=differentiate)
  return vf + tf, vb + tb


def contrastive_loss(batch: int, dim: int, triplet: bool) -> tuple[int, int]:
  """(forward, backward) of InfoNCE (+ the triplet loss's pairwise distances): one (B, D) x (D, B) each."""
  fwd = 2 * batch * batch * dim * (2 if triplet else 1)
  return fwd, 2 * fwd


def train_step(cfg: ModelConfig, *, batch: int, num_chunks: int, query_length: int, target_length: int,
               grid: tuple[int, int, int], adapters: Adapters, triplet: bool = False,
               target_grid: Optional[tuple[int, int, int]] = None) -> dict[str, int]:
  """One contrastive step (train/step.py): GradCache embeds every chunk once without gradients, then again under
  vjp; one chunk embeds once, with the backward. `grid` is each image's (t, h, w) patch grid (the target side's is
  `target_grid` when its bucket differs)."""
  chunk = batch // num_chunks
  passes = {"forward": 0, "backward": 0}
  for length, g in ((query_length, grid), (target_length, target_grid or grid)):
    fwd, bwd = embed_side(cfg, chunk, length, g, adapters, differentiate=True)
    passes["forward"] += num_chunks * fwd * (2 if num_chunks > 1 else 1)
    passes["backward"] += num_chunks * bwd
  fwd, bwd = contrastive_loss(batch, cfg.text.hidden_size, triplet)
  passes["forward"] += fwd
  passes["backward"] += bwd
  return {**passes, "total": passes["forward"] + passes["backward"]}


def prefill(cfg: ModelConfig, *, batch: int, prompt_length: int, cache_length: int, grid: tuple[int, int, int],
            images_per_prompt: int) -> int:
  """generate/sampler._prefill: the prompts' images, the decoder over the prompt into the cache, the last logits."""
  vf, _, _ = tower(vision_stages(cfg, grid, batch * images_per_prompt))
  tf, _, _ = tower(text_stages(cfg, batch, prompt_length, cache_length))
  return vf + tf + forward(lm_head(cfg, batch)[0])


def decode(cfg: ModelConfig, *, batch: int, cache_length: int, steps: int) -> int:
  """generate/sampler._decode run for `steps` tokens (max_new_tokens: the loop stops early only when every row
  has ended): one token per row through the decoder over the whole cache, and its logits."""
  tf, _, _ = tower(text_stages(cfg, batch, 1, cache_length))
  return steps * (tf + forward(lm_head(cfg, batch)[0]))
