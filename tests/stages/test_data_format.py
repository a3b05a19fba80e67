"""config data.format: adapt + evaluate on the tiny world's ArrayRecord form give exactly the results of its files
(the records hold the files' bytes: the same images decode to the same arrays), which is what lets the fingerprint
leave the format out; a missing or incomplete ArrayRecord dataset is named before any work starts."""

import glob
import json
import os
import shlex
import shutil

import numpy as np
import pytest
import safetensors.numpy

from configs import tiny
from recall_jax import main
from recall_jax.data import tfds_builders
from recall_jax.stages import artifacts, data_source, fingerprint


def _config(data_format: str):
  cfg = tiny.get_config()
  cfg.world.image_size = 56
  cfg.data.image_buckets = 56
  cfg.data.dataset = "cirr"  # one split per name: the cheapest layout
  cfg.data.format = data_format
  cfg.train.steps = 2
  cfg.train.global_batch_size = 8  # one example per test device
  cfg.train.log_every = cfg.train.checkpoint_every = cfg.train.eval_every = 2
  cfg.train.data_threads = 1
  cfg.lora.rank = 4
  cfg.lora.use_dora = False  # plain LoRA compiles faster; the format is what is under test
  cfg.optim.lr = 1e-2  # large enough that a different input would move the adapters differently
  cfg.eval.batch_size = 8
  cfg.eval.sheet_queries = 1
  cfg.eval.foundation_verification = False
  return cfg


@pytest.fixture(scope="module")
def jit_cache(tmp_path_factory):
  """A persistent compilation cache for this module: the second run compiles the first one's programs again
  (new model objects), and reading them back makes it seconds instead of a minute."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  before = {k: getattr(jax.config, k) for k in keys}
  jax.config.update(keys[0], str(tmp_path_factory.mktemp("jit_cache")))
  jax.config.update(keys[1], 0.0)
  compilation_cache.reset_cache()  # the cache is set up at a process's first compilation: again, with this folder
  yield
  for k, v in before.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, jit_cache):
  """The same world and base run through adapt + evaluate from its ArrayRecord form and from its files."""
  base = tmp_path_factory.mktemp("data_format")
  records_dir, files_dir, world = str(base / "records"), str(base / "files"), str(base / "world")
  main.run(_config("array_record"), records_dir, ["prepare"])  # world, tiny checkpoint, ArrayRecord form
  # The files run reads the very files the records were built from, moved out of the workdir: the ArrayRecord run
  # cannot read an image file, so its pixels (and contact sheet) come from the records.
  os.rename(os.path.join(records_dir, "prepare", "world"), world)
  from_records = main.run(_config("array_record"), records_dir, ["adapt", "evaluate"])
  files_cfg = _config("files")
  files_cfg.data.root = os.path.join(world, "cirr")
  files_cfg.model.checkpoint = os.path.join(records_dir, "prepare", "checkpoint")
  from_files = main.run(files_cfg, files_dir, ["adapt", "evaluate"])
  return {"records": (records_dir, from_records), "files": (files_dir, from_files), "files_cfg": files_cfg}


def _adapters(out: dict) -> dict[str, np.ndarray]:
  (path,) = glob.glob(os.path.join(out["adapt"]["adapter_dir"], "*.safetensors"))
  return safetensors.numpy.load_file(path)


def test_array_record_gives_the_results_of_files(runs):
  (records_dir, a), (files_dir, b) = runs["records"], runs["files"]
  assert artifacts.read_manifest(records_dir, "prepare")["array_record"]["configs"] == ["cirr"]
  assert a["evaluate"]["metrics"] == b["evaluate"]["metrics"] and set(a["evaluate"]["metrics"]) == {"baseline"}
  assert a["adapt"]["best_val_metrics"] == b["adapt"]["best_val_metrics"]
  assert a["adapt"]["last_train_metrics"] == b["adapt"]["last_train_metrics"]
  wa, wb = _adapters(a), _adapters(b)
  assert sorted(wa) == sorted(wb) and wa
  for name in wa:
    np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)
  ranks = []
  for d in (records_dir, files_dir):
    with open(os.path.join(d, "evaluate", "baseline", "ranks_cirr.json")) as f:
      ranks.append(json.load(f))
  assert ranks[0]["embedding_fingerprint"] == ranks[1]["embedding_fingerprint"]
  assert ranks[0]["ranks"] == ranks[1]["ranks"]
  assert os.path.getsize(os.path.join(records_dir, "evaluate", "baseline", "retrievals_cirr.png")) > 1000


def test_the_format_changes_no_fingerprint(tmp_path):
  files, records = _config("files"), _config("array_record")
  records.data.array_record_dir = str(tmp_path / "elsewhere")
  for stage in ("prepare", "adapt", "evaluate"):
    assert fingerprint.config_fields(files, str(tmp_path), stage) == fingerprint.config_fields(
        records, str(tmp_path), stage)


def test_missing_or_incomplete_records_are_named_before_work_starts(runs, tmp_path):
  records_dir, _ = runs["records"]
  cfg = _config("array_record")
  cfg.data.array_record_dir = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=r"nowhere.*\n.*cir_queries/cirr/1.0.0 is not built"):
    main.run(cfg, records_dir, ["mine"])
  assert not os.path.exists(os.path.join(records_dir, "mine"))

  partial = tmp_path / "partial"
  shutil.copytree(os.path.join(records_dir, "prepare", "array_record"), partial)
  (victim,) = glob.glob(str(partial / "cir_images" / "cirr" / "1.0.0" / "cir_images-val.array_record-*"))
  os.remove(victim)
  cfg.data.array_record_dir = str(partial)
  with pytest.raises(FileNotFoundError, match=rf"split 'val' lacks {victim}"):
    main.run(cfg, records_dir, ["mine"])
  assert not os.path.exists(os.path.join(records_dir, "mine"))


def test_the_named_command_writes_what_the_stages_read(runs, tmp_path):
  records_dir, _ = runs["records"]
  cfg = runs["files_cfg"].copy_and_resolve_references()
  cfg.data.format = "array_record"
  cfg.data.array_record_dir = str(tmp_path / "built")
  with pytest.raises(FileNotFoundError) as error:
    data_source.require_built(cfg, records_dir)
  command = next(line for line in str(error.value).splitlines() if "python -m" in line)
  argv = shlex.split(command[command.index("python -m"):])
  assert argv[:3] == ["python", "-m", "recall_jax.data.tfds_builders"]
  tfds_builders.main(argv[3:])
  data_source.require_built(cfg, records_dir)
  prepared = _config("array_record")  # prepare's build, from the same files before they moved
  for split in ("train", "val"):
    (built,), (ours,) = data_source.read_splits(cfg, records_dir, split), data_source.read_splits(
        prepared, records_dir, split)
    fields = lambda s: ([(q.qid, q.reference, q.captions, q.targets, q.subset) for q in s.queries], s.gallery,
                        sorted(s.images))  # noqa: E731 (query sources and image paths name the folders built from)
    assert fields(built) == fields(ours)
    load, our_load = data_source.image_loader(cfg, records_dir, [built]), data_source.image_loader(
        prepared, records_dir, [ours])
    assert all(load.encoded(n) == our_load.encoded(n) for n in built.images)
