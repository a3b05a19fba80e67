"""AOT memory plan: compile the config's device programs for a TPU slice (or the local GPUs) before paying for it.

  python -m recall_jax.aot --config configs/cirr_qwen25vl_7b.py --topology v5p:2x2x1

No TPU and no weights are needed (jax[tpu]'s libtpu compiles for a topology description on a CPU machine): the
programs of `abstract_programs` (the training step, calibrate's prefill + decode, the embedding pass) are compiled
from abstract inputs on a mesh of the topology's devices, and `memory_analysis()` gives each one's per-chip
argument / temporary / output bytes. FLOPs come from `flops.py` (XLA's cost_analysis counts a loop body once), and
the roofline bound is FLOPs / (chips x peak bf16 FLOP/s).

Full depth is slow and heavy to compile on a small machine (unrolled layers), so by default each program is
compiled at 1 and 2 layer pairs (n text layers + n vision blocks) and the per-chip bytes are extrapolated linearly
per pair to the deeper tower's depth; the output says which figures are measured and which extrapolated.
`--layers full` compiles the real depth instead. The exit status is 1, with what to change, when a program does
not fit the chip's HBM.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Optional

from absl import app, flags
from ml_collections import config_flags

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes: int
  peak_flops: float  # dense bf16 FLOP/s


# HBM per chip and dense bf16 peak from the Cloud TPU system-architecture pages (v4, v5e, v5p, v6e); v5p's HBM is the
# figure its compiler reports as available (95.74G), the others the pages' capacity.
TPU_CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12),
    "v5p": Chip("TPU v5p", int(95.74 * GiB), 459e12),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12),
}
# Dense bf16 peak of NVIDIA's data sheets (H100 / H200 SXM; A100); HBM comes from the device itself.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
# TPU_ACCELERATOR_TYPE silences libtpu's start-up complaints on a machine without a TPU: name the slice by chips.
_ACCELERATOR_TYPE = {"v4": "v4-{cores}", "v5p": "v5p-{cores}", "v5e": "v5litepod-{chips}", "v6e": "v6e-{chips}"}


def tpu_target(topology: str):
  """(devices, chip) of a TPU topology description such as 'v5p:2x2x1'."""
  generation, _, shape = topology.partition(":")
  if generation not in TPU_CHIPS or not shape:
    raise ValueError(f"--topology {topology!r}: expected <generation>:<shape> with generation one of "
                     f"{sorted(TPU_CHIPS)}, e.g. v5p:2x2x1")
  chips = 1
  for d in shape.split("x"):
    chips *= int(d)
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", _ACCELERATOR_TYPE[generation].format(chips=chips, cores=2 * chips))
  # libtpu takes a machine-wide lock meant for a real TPU; compiling for a description touches none, so several
  # plans (or test workers) may run at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  except Exception as e:  # no libtpu, or a shape libtpu does not know
    raise RuntimeError(f"--topology {topology!r}: no TPU topology description ({e}); it needs jax[tpu] at the "
                       "project's jax version (libtpu, see requirements-test.txt)") from e
  return list(topo.devices), TPU_CHIPS[generation]


def gpu_target():
  """(devices, chip) of this machine's GPUs (unverified: no GPU was at hand when this was written)."""
  import jax
  devices = jax.devices("gpu")
  kind = devices[0].device_kind
  peak = next((v for k, v in GPU_PEAK_FLOPS.items() if k in kind), None)
  if peak is None:
    raise ValueError(f"no peak FLOP/s known for GPU {kind!r}; add it to recall_jax.aot.GPU_PEAK_FLOPS")
  return devices, Chip(kind, int(devices[0].memory_stats()["bytes_limit"]), peak)


def model_config(cfg):
  """(model config, where it came from): config.json of config model.checkpoint, else the shapes of the released
  model of config model.family (Qwen2.5-VL-7B, Qwen3-VL-8B)."""
  from recall_jax.models import family
  fam = family.get(cfg.model.family)
  run = dict(position_mode=cfg.model.position_mode, remat=cfg.model.remat)  # the run's choices, not the checkpoint's
  if cfg.model.checkpoint:
    family.of_checkpoint(cfg.model.checkpoint, expected=cfg.model.family)
    return (fam.config_cls.from_pretrained(cfg.model.checkpoint).replace(**run),
            f"{cfg.model.checkpoint}/config.json")
  return fam.reference_shapes.replace(**run), f"{fam.reference_name} shapes (model.checkpoint unset)"


def reduced(model_cfg, pairs: int):
  """The model with `pairs` text layers and `pairs` vision blocks (full-attention blocks and DeepStack taps among
  them kept)."""
  v = model_cfg.vision
  kept = {k: tuple(i for i in getattr(v, k) if i < pairs)
          for k in ("fullatt_block_indexes", "deepstack_visual_indexes") if hasattr(v, k)}
  vision = dataclasses.replace(v, depth=pairs, **kept)
  text = dataclasses.replace(model_cfg.text, num_hidden_layers=pairs)
  return model_cfg.replace(vision=vision, text=text)


def full_pairs(model_cfg) -> int:
  """The depth the pairs are extrapolated to: the deeper tower's (so the shallower one is over-counted)."""
  return max(model_cfg.text.num_hidden_layers, model_cfg.vision.depth)


FIELDS = ("arguments", "temporaries", "outputs", "aliased")


def memory(compiled) -> dict[str, int]:
  """Per-chip bytes of a compiled program; total = what it holds at once (donated inputs counted once)."""
  m = compiled.memory_analysis()
  out = {"arguments": int(m.argument_size_in_bytes), "temporaries": int(m.temp_size_in_bytes),
         "outputs": int(m.output_size_in_bytes), "aliased": int(m.alias_size_in_bytes)}
  out["total"] = out["arguments"] + out["temporaries"] + out["outputs"] - out["aliased"]
  return out


def extrapolate(a: dict[str, int], b: dict[str, int], na: int, nb: int, n: int) -> dict[str, int]:
  """Per-field linear extrapolation from depth na (figures a) and nb (b) to depth n."""
  return {k: int(round(a[k] + (b[k] - a[k]) * (n - na) / (nb - na))) for k in (*FIELDS, "total")}


class DoesNotFit(Exception):
  """The compiler refused the program for the chip's memory (RESOURCE_EXHAUSTED)."""


def compile_lowered(lowered):
  try:
    return lowered.compile()
  except Exception as e:
    if "RESOURCE_EXHAUSTED" in str(e):
      raise DoesNotFit(str(e).splitlines()[0][:400]) from e
    raise


def compile_programs(cfg, model_cfg, mesh, name: str) -> dict[str, dict[str, int]]:
  """Per-chip memory of each compiled program of `name` (calibrate: prefill and decode) at model_cfg's depth."""
  from recall_jax import abstract_programs as programs
  if name == "calibrate":
    prefill, decode = programs.calibrate(cfg, model_cfg, mesh)
    compiled = compile_lowered(prefill)
    return {"prefill": memory(compiled), "decode": memory(compile_lowered(decode(compiled)))}
  build: Callable = {"train": programs.train, "embed": programs.embed}[name]
  return {name: memory(compile_lowered(build(cfg, model_cfg, mesh)))}


def analytic_flops(cfg, model_cfg) -> dict[str, int]:
  """FLOPs of one call of each program at the config's full depth (flops.py)."""
  from recall_jax import abstract_programs as programs, flops
  from recall_jax.models import family
  from recall_jax.train import trainer
  grid = programs.image_grid(cfg, model_cfg)
  t, lo = cfg.train, cfg.lora
  regex = lo.target_regex or family.of_config(model_cfg).lora_target_regex
  adapters = flops.Adapters(regex=regex, rank=lo.rank, dora=lo.use_dora,
                            dropout=lo.dropout > 0)
  batch, prompt, cache = programs.calibrate_shapes(cfg)
  return {
      "train": flops.train_step(model_cfg, batch=t.global_batch_size, num_chunks=trainer.gradcache_chunks(t),
                                query_length=max(cfg.data.query_lengths), target_length=max(cfg.data.target_lengths),
                                grid=grid, adapters=adapters, triplet=cfg.loss.triplet_weight > 0)["total"],
      "prefill": flops.prefill(model_cfg, batch=batch, prompt_length=prompt, cache_length=cache, grid=grid,
                               images_per_prompt=programs.IMAGES_PER_PROMPT),
      "decode": flops.decode(model_cfg, batch=batch, cache_length=cache, steps=cfg.calibrate.max_new_tokens),
      "embed": flops.embed_side(model_cfg, programs.embed_batch_size(cfg), max(cfg.data.query_lengths), grid)[0],
  }


def advice(program: str, cfg, mem: dict[str, int], chip: Chip, mesh) -> str:
  """What to change so that `program` fits, biggest lever first."""
  shards = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
  fsdp = (f"shard the frozen base over fsdp (config mesh.shape, e.g. (1, {mesh.size}, 1), and sharding.rules, "
          "e.g. the fsdp rules in configs/base.py)")
  levers = {
      "train": [f"lower train.chunk_size (GradCache: activations of one chunk, now {cfg.train.chunk_size} examples, "
                f"{max(1, cfg.train.chunk_size // shards)} per chip)", fsdp,
                f"activation checkpointing: model.remat = 'full' or 'dots_no_batch' (now {cfg.model.remat!r})"],
      "prefill": [f"lower calibrate.batch_size (now {cfg.calibrate.batch_size}) or calibrate.prompt_lengths / "
                  "max_new_tokens (the KV cache)", fsdp],
      "embed": [f"lower eval.batch_size / mine.batch_size (now {cfg.eval.batch_size} / {cfg.mine.batch_size})", fsdp],
  }[program if program != "decode" else "prefill"]
  if mem and mem["arguments"] > chip.hbm_bytes / 2:  # the weights alone take half the chip: fsdp first
    levers.remove(fsdp)
    levers.insert(0, fsdp)
  return "; or ".join(levers)


def _gib(x: Optional[int]) -> str:
  return "-" if x is None else f"{x / GiB:.2f}"


def plan(cfg, model_cfg, mesh, chip: Chip, layers: str, programs: list[str], log=print) -> dict[str, Any]:
  """Compiles and extrapolates every program; returns the plan (also printed through `log`)."""
  depths = None if layers == "full" else [int(x) for x in layers.split(",")]
  if depths is not None and (len(depths) != 2 or depths[0] >= depths[1] or depths[0] < 1):
    raise ValueError(f"--layers {layers!r}: two increasing depths such as '1,2', or 'full'")
  n_full = full_pairs(model_cfg)
  out: dict[str, Any] = {"programs": {}}
  for name in programs:
    runs = []
    for depth in ([None] if depths is None else depths):
      m_cfg = model_cfg if depth is None else reduced(model_cfg, depth)
      label = "full depth" if depth is None else f"{depth} layer pair{'s' * (depth > 1)}"
      start = time.time()
      try:
        figures, error = compile_programs(cfg, m_cfg, mesh, name), None
      except DoesNotFit as e:
        figures, error = None, str(e)
      seconds = time.time() - start
      summary = error or ", ".join(f"{part} {_gib(m['arguments'])} / {_gib(m['temporaries'])} / {_gib(m['outputs'])}"
                                   f" GiB" for part, m in figures.items())
      log(f"  compiled {name} at {label} in {seconds:.0f} s (arguments / temporaries / outputs per chip): {summary}")
      runs.append({"depth": depth, "label": label, "figures": figures, "error": error, "seconds": seconds})
      if error:
        break
    results = []
    for run in runs:
      for part, mem in (run["figures"] or {name: None}).items():
        results.append({"program": part, "depth": run["label"], "source": "measured" if mem else "compiler refused",
                        **(mem or {}), "error": run["error"]})
    if len(runs) == 2 and all(r["figures"] for r in runs):
      for part in runs[0]["figures"]:
        mem = extrapolate(runs[0]["figures"][part], runs[1]["figures"][part], depths[0], depths[1], n_full)
        results.append({"program": part, "depth": f"{n_full} layer pairs", "source": "extrapolated", **mem,
                        "error": None})
    out["programs"][name] = results
  parts = {"train": ["train"], "calibrate": ["prefill", "decode"], "embed": ["embed"]}
  flop_counts = analytic_flops(cfg, model_cfg)
  out["flops"] = {part: flop_counts[part] for name in programs for part in parts[name]}
  return out


def fits(row: dict, chip: Chip) -> bool:
  return row["error"] is None and row["total"] <= chip.hbm_bytes


def report(result: dict, cfg, model_cfg, mesh, chip: Chip, log=print) -> list[str]:
  """Prints the plan; returns the failure messages (one per program that does not fit)."""
  log(f"{'program':8} {'depth':16} {'source':17} {'arguments':>9} {'temporaries':>11} {'outputs':>8} "
      f"{'aliased':>8} {'total':>8}  GiB per chip, HBM {chip.hbm_bytes / GiB:.2f}")
  failures = []
  for name, rows in result["programs"].items():
    for row in rows:
      verdict = "" if row["error"] is None and fits(row, chip) else "  DOES NOT FIT"
      log(f"{row['program']:8} {row['depth']:16} {row['source']:17} {_gib(row.get('arguments')):>9} "
          f"{_gib(row.get('temporaries')):>11} {_gib(row.get('outputs')):>8} {_gib(row.get('aliased')):>8} "
          f"{_gib(row.get('total')):>8}{verdict}")
    final: dict[str, dict] = {}
    for row in rows:  # the deepest figure of each compiled program decides
      final[row["program"]] = row
    for part, row in final.items():
      if not fits(row, chip):
        why = row["error"] or f"{_gib(row['total'])} GiB per chip ({row['source']}, {row['depth']})"
        failures.append(f"{part} does not fit {chip.name} ({_gib(chip.hbm_bytes)} GiB): {why}. Change: "
                        f"{advice(part, cfg, row if row['error'] is None else {}, chip, mesh)}")
  chips = mesh.size
  log(f"analytic FLOPs at full depth ({model_cfg.text.num_hidden_layers} text layers, {model_cfg.vision.depth} "
      f"vision blocks; matmuls only) and roofline bound on {chips} x {chip.name} at {chip.peak_flops / 1e12:.0f} "
      "TFLOP/s bf16 each:")
  for part, f in result["flops"].items():
    log(f"  {part:8} {f / 1e12:12.1f} TFLOP   >= {f / (chips * chip.peak_flops):8.3f} s")
  return failures


def define_flags() -> None:
  """aot's flags, defined only when it runs as the program: `main` defines its own --config in the same absl
  registry, and a module-level definition here made importing both (as the test suite does) a DuplicateFlagError."""
  config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py).")
  flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology to compile for, e.g. v5p:2x2x1 (v5p-8), "
                    "v5e:2x4 (v5e-8), v5e:4x4 (v5e-16).")
  flags.DEFINE_enum("platform", "tpu", ["tpu", "gpu"], "tpu: the --topology slice; gpu: the local GPUs.")
  flags.DEFINE_string("layers", "1,2", "Layer pairs to compile and extrapolate from (two depths, e.g. "
                    "'1,2'), or 'full' for the config's depth (hours and tens of GB of host memory at 7B).")
  flags.DEFINE_list("programs", "train,calibrate,embed", "Programs to plan: train, calibrate, embed.")
  flags.DEFINE_string("json", None, "Also write the plan to this JSON file.")
  flags.DEFINE_float("hbm_gib", None, "Plan against this many GiB per chip instead of the chip's HBM "
                   "(e.g. to keep headroom for other buffers).")


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  cfg = FLAGS.config
  if cfg is None:
    raise app.UsageError("--config is required")
  if FLAGS.platform == "tpu":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host only traces; libtpu compiles for the topology
    devices, chip = tpu_target(FLAGS.topology)
    where = FLAGS.topology
  else:
    devices, chip = gpu_target()
    where = f"{len(devices)} local GPU(s)"
  if FLAGS.hbm_gib is not None:
    chip = dataclasses.replace(chip, hbm_bytes=int(FLAGS.hbm_gib * GiB))
  from recall_jax import parallel
  unknown = sorted(set(FLAGS.programs) - {"train", "calibrate", "embed"})
  if unknown:
    raise app.UsageError(f"--programs: unknown {unknown}; choose from train, calibrate, embed")
  mesh = parallel.make_mesh(tuple(cfg.mesh.shape), devices=devices)
  model_cfg, source = model_config(cfg)
  t, v = model_cfg.text, model_cfg.vision
  print(f"AOT plan for {where}: {len(devices)} x {chip.name}, mesh {dict(mesh.shape)}; model: {source}, text "
        f"{t.num_hidden_layers} x {t.hidden_size}, vision {v.depth} x {v.hidden_size}")
  if FLAGS.layers != "full":
    print(f"bytes measured at {FLAGS.layers} layer pairs (n text layers + n vision blocks, the full-attention "
          f"blocks among the first n kept) and extrapolated linearly per pair to {full_pairs(model_cfg)} pairs (the "
          "deeper tower; the other is over-counted); FLOPs are analytic at full depth")
  result = plan(cfg, model_cfg, mesh, chip, FLAGS.layers, FLAGS.programs,
                log=lambda s: print(s, file=sys.stderr, flush=True))
  failures = report(result, cfg, model_cfg, mesh, chip)
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({"target": where, "chip": dataclasses.asdict(chip), "mesh": dict(mesh.shape), "model": source,
                 "layers": FLAGS.layers, **result, "failures": failures}, f, indent=2)
  for message in failures:
    print(message, file=sys.stderr)
  if failures:
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
