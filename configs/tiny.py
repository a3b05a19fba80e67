"""The demo's pipeline at test scale: the tiny world, the smallest tiny model with the fixed byte-level tokenizer,
untaught (no teach stage), direct yes/no answers and minimal-JSON rewrites. Tests start from this and override;
the main job is configs/demo.py.

Launch (seconds on a CPU):
  python -m recall_jax.main --config configs/tiny.py --workdir runs/tiny
"""

import ml_collections

from configs import demo


def get_config() -> ml_collections.ConfigDict:
  c = demo.get_config()
  c.stages = "prepare,adapt,mine,calibrate,refine,evaluate,report"
  c.world.scale = "tiny"
  c.model.tiny_tokenizer = "bytes"
  c.model.tiny = ml_collections.ConfigDict({"text": {}, "vision": {}})  # tiny_config's defaults (64 x 2, 32 x 2)
  c.data.query_lengths = (320,)  # the byte-level tokenizer: prompts are long
  c.data.target_lengths = (128,)
  c.teach.vision.steps = 0
  c.teach.reasoning = "direct"
  c.teach.vqa_pairs = 1
  c.teach.repeats = ml_collections.ConfigDict()
  c.teach.lengths = (256, 768, 1536)
  c.teach.batch_size = 8
  c.teach.steps = 300
  c.teach.quality.enabled = False
  c.calibrate.batch_size = 8
  c.calibrate.max_records = 64
  c.calibrate.prompt_mode = "minimal_json"
  c.calibrate.prompt_dir = ""  # the packaged, paper-style prompts (the demo's compact set is for its world BPE)
  c.calibrate.prompt_lengths = (1024, 2048)
  c.calibrate.max_new_tokens = 192
  c.calibrate.verify_reasoning = "direct"
  c.calibrate.verify_turns = 1
  return c
