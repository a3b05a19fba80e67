"""The `recall-jax` console script (pyproject [project.scripts]); also `python -m recall_jax.cli`.

    recall-jax run --config configs/demo.py --workdir runs/demo       # the pipeline: python -m recall_jax.main
    recall-jax encode ADAPTERS --images FOLDER --out gallery.npz      # or --data-root ROOT [--split val]
    recall-jax search ADAPTERS --gallery gallery.npz --reference ref.png --text "is red" [--k 5]
    recall-jax evaluate ADAPTERS --data-root ROOT [--split val] [--out results.json]

ADAPTERS is a training stage's adapter directory (<workdir>/adapt/adapters, <workdir>/refine/adapters): its
recall_config.json names the base checkpoint and the preprocessing, so every subcommand embeds as the run did.
`run` takes main's absl flags (--config, --config.<field>=..., --workdir, --stages, --on_change); the others parse
with argparse. Results go to stdout, progress lines to stderr.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Optional, Sequence

import numpy as np

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _embedder(args):
  from recall_jax.embed import Embedder
  return Embedder.from_pretrained(args.adapters, checkpoint=args.checkpoint, batch_size=args.batch_size)


def _splits(rc, dataset_root: str, split: str, category: Optional[str]):
  """The dataset's splits under its published layout (FashionIQ: one per category) with the run's reader settings."""
  from recall_jax.data import readers
  if rc.dataset == "fashioniq":
    return readers.read_fashioniq(dataset_root, split, categories=(category,) if category else rc.categories,
                                  image_ext=rc.image_ext)
  if category:
    raise SystemExit(f"--category is for FashionIQ; these adapters were trained on {rc.dataset}")
  read = {"cirr": readers.read_cirr, "circo": readers.read_circo}[rc.dataset]
  return [read(dataset_root, split)]


def _folder_images(folder: str) -> tuple[list[str], list[str]]:
  """(ids, paths) of the images under `folder`, sorted; an id is the path relative to it without its extension."""
  from recall_jax import files
  root = files.path(folder)  # a local folder or a bucket path
  paths = sorted(os.fspath(d / f) for d, _, names in root.walk() for f in names if f.lower().endswith(IMAGE_EXTS))
  if not paths:
    raise SystemExit(f"--images {folder}: no {'/'.join(IMAGE_EXTS)} files")
  return [os.path.splitext(files.relpath(p, root))[0] for p in paths], paths


def _model_key(embedder) -> str:
  from recall_jax.eval import embedding_cache
  return embedding_cache.digest(embedder.fingerprint_parts())[:16]


def encode(args) -> None:
  from recall_jax import recall_config
  rc = recall_config.read(args.adapters)
  if args.images:
    ids, paths = _folder_images(args.images)
    source = args.images
  else:
    ids, paths = [], []
    for s in _splits(rc, args.data_root, args.split, args.category):
      for name in s.gallery:
        if name not in ids:
          ids.append(name)
          paths.append(s.images[name])
    source = f"{args.data_root} {args.split}"
  embedder = _embedder(args)
  emb = embedder.embed_targets(paths, cache_dir=args.cache_dir)
  from recall_jax import files
  buf = io.BytesIO()
  np.savez(buf, embeddings=emb, ids=np.asarray(ids), paths=np.asarray(paths), model=np.asarray(_model_key(embedder)))
  files.atomic_write_bytes(args.out, buf.getvalue())
  print(f"encoded {len(ids)} images from {source}: embeddings {emb.shape[0]} x {emb.shape[1]} -> {args.out}")


def search(args) -> None:
  if len(args.reference) != len(args.text):
    raise SystemExit(f"search: {len(args.reference)} --reference but {len(args.text)} --text (one of each a query)")
  from recall_jax import files
  embedder = _embedder(args)
  with np.load(io.BytesIO(files.read_bytes(args.gallery))) as g:
    gallery, ids, model = g["embeddings"], g["ids"], str(g["model"])
  if model != _model_key(embedder):
    raise SystemExit(f"{args.gallery} was encoded by another model or preprocessing (key {model}, these adapters "
                     f"{_model_key(embedder)}): encode the gallery again with {args.adapters}")
  q = embedder.embed_queries(args.reference, args.text, category=args.category)
  indices, scores = embedder.search(q, gallery, k=args.k)
  for n, (ref, text) in enumerate(zip(args.reference, args.text)):
    print(f"query {n + 1}: {ref} + {text!r}")
    for rank, (i, s) in enumerate(zip(indices[n], scores[n])):
      print(f"  {rank + 1:>3}. {ids[i]}  {s:.4f}")


def evaluate(args) -> None:
  from recall_jax import files, recall_config
  from recall_jax.eval import metrics, results, retrieval
  rc = recall_config.read(args.adapters)
  embedder = _embedder(args)
  summary, per_category = {}, {}
  for split in _splits(rc, args.data_root, args.split, args.category):
    tag = split.dataset + (f"_{split.category}" if split.category else "")
    q, g = embedder.embed_split(split)
    scores = retrieval.evaluate_split(split, q, g, rc.protocol)["metrics"]
    summary[tag] = scores
    if split.category:
      per_category[split.category] = scores
    print(f"{tag} {args.split}: " + " ".join(f"{k}={v:.2f}" for k, v in scores.items()))
  if len(per_category) > 1:
    summary["fashioniq_average"] = metrics.fashioniq_summary(per_category)
    print("fashioniq average: " + " ".join(f"{k}={v:.2f}" for k, v in summary["fashioniq_average"].items()))
  if args.out:
    results.write_results(args.out, metrics=summary, protocol=rc.protocol, config=rc.to_dict(),
                          checkpoint=files.absolute(args.adapters))
    print(f"results -> {args.out}")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="recall-jax", description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="command", required=True, metavar="{run,encode,search,evaluate}")
  sub.add_parser("run", help="the pipeline's stages (python -m recall_jax.main; absl flags --config, --workdir)")

  def command(name, fn, help_):
    c = sub.add_parser(name, help=help_)
    c.add_argument("adapters", help="adapter directory of a training stage (holds recall_config.json)")
    c.add_argument("--checkpoint", help="base checkpoint (default: the one named in recall_config.json)")
    c.add_argument("--batch-size", type=int, help="images per batch (default: the run's eval batch size)")
    c.set_defaults(fn=fn)
    return c

  def dataset_flags(c, root_group, **required):
    root_group.add_argument("--data-root", **required, help="dataset root in its published layout (the synthetic "
                            "world: <workdir>/prepare/world/<dataset>)")
    c.add_argument("--split", default="val")
    c.add_argument("--category", help="FashionIQ category (default: every category of the run)")

  c = command("encode", encode, "embed a gallery (an image folder or a dataset split) to an .npz file")
  source = c.add_mutually_exclusive_group(required=True)
  source.add_argument("--images", help="folder of gallery images (ids: paths relative to it, no extension)")
  dataset_flags(c, source)
  c.add_argument("--out", required=True, help="output .npz: embeddings, ids, paths, model key")
  c.add_argument("--cache-dir", help="reuse gallery embeddings of the same model, preprocessing and files")

  c = command("search", search, "top-k gallery ids for queries (reference image + modification text)")
  c.add_argument("--gallery", required=True, help=".npz written by encode")
  c.add_argument("--reference", action="append", required=True, help="reference image (repeat for more queries)")
  c.add_argument("--text", action="append", required=True, help="modification text, one per --reference")
  c.add_argument("--category", help="FashionIQ category of the queries")
  c.add_argument("--k", type=int, default=10)

  c = command("evaluate", evaluate, "metrics of the adapters on a dataset split, under the run's protocol")
  dataset_flags(c, c, required=True)
  c.add_argument("--out", help="results file (metrics, protocol, recall_config, adapters)")
  return p


def main(argv: Optional[Sequence[str]] = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["run"]:
    from absl import app

    from recall_jax import main as main_lib
    # As `python -m recall_jax.main` has it: the working directory on sys.path, so that config files import
    # their siblings (configs/tiny.py: `from configs import demo`).
    sys.path.insert(0, os.getcwd())
    app.run(main_lib.main, argv=["recall-jax run", *argv[1:]])
    return
  args = _parser().parse_args(argv)
  from recall_jax import main as main_lib
  main_lib.setup_logging()
  args.fn(args)


if __name__ == "__main__":
  main()
