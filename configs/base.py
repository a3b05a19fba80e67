"""Shared defaults: ReCALL on CIRR with Qwen2.5-VL-7B-Instruct and the paper's hyperparameters (DoRA r16 / alpha 64
on the LLM q/k/v/o/down and the vision MLP down, AdamW lr 2e-5 with cosine and 10% warmup, global batch 512,
InfoNCE tau 0.02, 300 Stage-1 steps). Other configs start from this and override; it is not launched directly.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """ReCALL on CIRR with Qwen2.5-VL-7B-Instruct (the paper's hyperparameters); other configs override this."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = "adapt,mine,calibrate,refine,evaluate,report"
  # ReCALL's loop: (mine -> calibrate -> refine) this many times after adapt; round r >= 2 mines with round r-1's
  # refined retriever and writes under <workdir>/round<r>/ (the released code runs 1).
  c.rounds = 1

  c.world = ml_collections.ConfigDict()
  c.world.scale = "demo"  # synthetic world only (prepare stage): tiny | demo | large
  c.world.seed = 0
  c.world.image_size = 112

  c.model = ml_collections.ConfigDict()
  # The backbone: qwen2_5_vl | qwen3_vl (recall_jax/models/family.py); a checkpoint's config.json must agree.
  c.model.family = "qwen2_5_vl"
  c.model.checkpoint = ml_collections.config_dict.placeholder(str)  # required: HF checkpoint dir of model.family
  # ("" only with the prepare stage, which then writes a tiny random checkpoint into the workdir)
  c.model.tiny = ml_collections.ConfigDict({"text": {}, "vision": {}})
  c.model.init_seed = 0
  # The tiny checkpoint's tokenizer (prepare stage): "world" = a byte-level BPE trained on the synthetic world's
  # training text (ids of the tiny layout, vocab model.tiny.text.vocab_size); "bytes" = the fixed 512-id one.
  c.model.tiny_tokenizer = "bytes"
  c.model.dtype = "bfloat16"  # base weights; adapters are always fp32
  c.model.position_mode = "mrope"  # mrope | sequential
  # Activation checkpointing of each decoder layer / vision block in training: none | full | dots | dots_no_batch
  # (recall_jax/models/remat.py). Memory for about one more forward.
  c.model.remat = "none"

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "cirr"  # fashioniq | cirr | circo
  c.data.root = ml_collections.config_dict.placeholder(str)  # dataset root in its real layout ("" = synthetic)
  c.data.categories = ("dress", "shirt", "toptee")
  c.data.image_ext = ".png"
  c.data.on_error = "raise"
  # How stages read the dataset: "files" (its published layout: one file per image) or "array_record" (the same
  # images' bytes in ArrayRecord files, as on a pod: a prepared folder, not millions of small files). Results are
  # the same. array_record_dir: "" = <workdir>/prepare/array_record (the prepare stage writes it from data.root or
  # the synthetic world); else a folder built by `python -m recall_jax.data.tfds_builders` (e.g. gs://...).
  c.data.format = "files"
  c.data.array_record_dir = ""
  c.data.image_buckets = 364  # one square bucket (13x13 merged tokens <= max_pixels): one grid per batch
  c.data.query_lengths = (320,)  # tokens incl. the image pads
  c.data.target_lengths = (256,)
  c.data.caption_join = "and"

  c.eval = ml_collections.ConfigDict()
  c.eval.split = "val"
  c.eval.batch_size = 64
  c.eval.exclude_reference = ml_collections.config_dict.placeholder(bool)  # None: the dataset's protocol default
  c.eval.sheet_queries = 8
  # Per val query, the foundation model's P(yes) of the calibrate verify prompt over (reference, ground truth, text),
  # for the report's Fig.-1 panel (R@1 over the queries F verifies); batches of calibrate.batch_size.
  c.eval.foundation_verification = True

  c.lora = ml_collections.ConfigDict()
  c.lora.target_regex = ""  # empty: the effective ReCALL set (LLM q/k/v/o/down, vision MLP down)
  c.lora.rank = 16
  c.lora.alpha = 64
  c.lora.dropout = 0.1
  c.lora.use_dora = True
  c.lora.init = "gaussian"

  c.loss = ml_collections.ConfigDict()
  c.loss.temperature = 0.02
  c.loss.infonce_weight = 1.0
  c.loss.triplet_weight = 0.0
  c.loss.margin = 0.05
  c.loss.symmetric = False
  c.loss.mask_duplicate_targets = True

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-5
  c.optim.warmup_fraction = 0.1
  c.optim.weight_decay = 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.clip_norm = 1.0

  c.train = ml_collections.ConfigDict()
  c.train.steps = 300  # paper: 300 (stage 1); released code: 5000
  c.train.global_batch_size = 512
  c.train.chunk_size = 64  # GradCache chunks (0: one chunk); per-device 8 on 8 GPUs
  c.train.log_every = 10
  c.train.checkpoint_every = 50
  c.train.eval_every = 50
  c.train.keep_checkpoints = 2
  c.train.best_metric = "R@1"
  c.train.data_threads = 2
  c.train.data_workers = 8

  c.mine = ml_collections.ConfigDict()
  c.mine.split = "train"
  c.mine.strategy = "self_guided"  # self_guided | random | hard_negative (ablations)
  c.mine.top_k = 10
  c.mine.max_per_query = 5  # ReCALL's FashionIQ config uses 1
  c.mine.batch_size = 32
  c.mine.seed = 0  # the random strategy's draws
  c.mine.random_pool = 50  # random strategy (Table 3 ablation): draw from the retriever's top-50, not the gallery
  c.mine.sheet_queries = 8

  # Optional stage "teach": fine-tune the foundation model on the synthetic world's SFT data (generative objective);
  # calibrate then uses its merged checkpoint (<workdir>/teach/checkpoint) as the foundation model.
  c.teach = ml_collections.ConfigDict()
  c.teach.tasks = ("caption", "vqa", "rewrite", "verify")
  c.teach.lengths = (256, 768, 1536)  # token buckets; the rewrite prompt is the longest
  c.teach.seed = 0  # teach's own randomness (examples, init, batches, quality draws): F stays fixed across config.seed
  c.teach.batch_size = 8
  c.teach.steps = 300
  c.teach.trainable_regex = ""  # "": LoRA (teach.lora), merged at the end; a regex of param paths: full fine-tuning
  c.teach.lora = ml_collections.ConfigDict()
  c.teach.lora.target_regex = r"language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"  # every LLM projection
  c.teach.lora.rank = 64
  c.teach.lora.alpha = 128
  c.teach.lora.dropout = 0.0
  c.teach.lora.init = "kaiming"
  c.teach.optim = ml_collections.ConfigDict(
      {"lr": 1e-4, "warmup_fraction": 0.05, "weight_decay": 0.0, "b1": 0.9, "b2": 0.999, "clip_norm": 1.0})
  # "describe": yes/no answers and rewrites first put what the pictures show into words (generate/sft.py); "direct".
  c.teach.reasoning = "direct"
  c.teach.vqa_pairs = 1  # true/false question pairs per training image, each on its own attribute
  c.teach.repeats = ml_collections.ConfigDict()  # task -> k: its examples k times per epoch (e.g. {"rewrite": 3})
  c.teach.decision_weight = 1.0  # loss weight of the yes/no token of vqa / verify answers (1: the plain mean)
  # Phase 1: the vision tower classifies the training images' attributes (0 steps: skipped; a real F's tower is
  # pretrained already).
  c.teach.vision = ml_collections.ConfigDict(
      {"steps": 0, "batch_size": 64, "lr": 3e-3, "log_every": 100, "val_images": 256,
       # new renders of the synthetic world's generator beside the training images (training combinations only;
       # the stand-in for a real tower's pretraining corpus): 0 = the training split's images alone
       "fresh_images": 0})
  # F's quality on the val split against the oracle, recorded in the manifest (synthetic world only).
  c.teach.quality = ml_collections.ConfigDict(
      {"enabled": False, "vqa_images": 240, "rewrite_queries": 96, "verify_queries": 48})
  # Every this many steps, the image dependence of F's P(yes) on a few val images is logged (0: never).
  c.teach.probe_every = 0
  c.teach.log_every = 10
  c.teach.checkpoint_every = 100
  c.teach.keep_checkpoints = 1
  c.teach.data_threads = 2
  # A folder where a finished teach is stored and reused by later runs with the same recipe, world, base and code
  # (stages/teach_cache.py); "" = never. launch/demo.sh and launch/study.sh set ~/.cache/recall_jax/teach.
  c.teach.cache_dir = ""

  c.calibrate = ml_collections.ConfigDict()
  c.calibrate.prompt_mode = "minimal_json"  # minimal_json (ReCALL code's default) | staged_cot (the paper's)
  c.calibrate.prompt_dir = ""  # empty: the packaged templates in recall_jax/generate/prompts/
  c.calibrate.batch_size = 64
  c.calibrate.prompt_lengths = (1024, 2048)  # token buckets of rewrite / verification prompts (and KV cache)
  c.calibrate.max_new_tokens = 128
  c.calibrate.temperature = 0.0  # 0: greedy
  c.calibrate.top_k = 0
  c.calibrate.top_p = 1.0
  c.calibrate.seed = 0
  c.calibrate.max_records = 0  # 0: every mined record
  c.calibrate.rewriter = "model"  # model (F writes the rewrite) | oracle (upper bound: the world's oracle writes it)
  c.calibrate.vqa_threshold = 0.95
  c.calibrate.vqa_filter = True  # False (Table 4 "+ CoT generation"): keep every parsed rewrite; P(yes) still recorded
  c.calibrate.answer_words = ("no", "yes")  # P(yes) = softmax over the first token of each, at the answer position
  # "describe": F writes what the pictures show, then P(yes) is read after "Answer:" (generate/sft.py); "direct".
  c.calibrate.verify_reasoning = "direct"
  c.calibrate.describe_max_tokens = 64
  c.calibrate.verify_turns = 1  # 2 (describe reasoning): Picture 1 + text, then Picture 2 (prompt_files.VerifyTurns)
  c.calibrate.decomposed_verification = False  # also verify one statement per intent; P(yes) = min over all
  c.calibrate.oracle = True  # score rewrites and VQA decisions with the world's oracle when scene graphs exist
  c.calibrate.sheet_samples = 8

  c.refine = ml_collections.ConfigDict()
  c.refine.steps = 350
  c.refine.infonce_weight = 0.9  # paper-era ReCALL code: 0.9 InfoNCE + 0.1 triplet
  c.refine.triplet_weight = 0.1
  c.refine.margin = 0.05
  # Ablations: mode "originals" trains on the original triplets only (more steps, no corrective signal);
  # "hard_negative" adds each mined instance as an extra negative of its original query, nothing rewritten.
  c.refine.mode = "corrective"  # corrective | originals | hard_negative
  c.refine.grouped = True  # False (Table 4 rows 2-3): plain shuffled batches and no triplet loss

  # Frozen base weights: (regex over parameter paths, PartitionSpec entries), first match wins, default replicated.
  # Data parallel with a replicated bf16 base fits 7B + LoRA on 80 GB GPUs; to shard it over fsdp instead, e.g.
  #   [(r"(q|k|v|o|gate|up|down)_proj/kernel", ("fsdp", None)), (r"embed_tokens|lm_head", (None, "fsdp"))]
  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = ()

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor): data parallel, bf16 base replicated
  return c
