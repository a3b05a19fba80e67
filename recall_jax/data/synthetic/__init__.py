"""The synthetic CIR world: procedurally rendered garments, triplets with near-misses, real dataset layouts, oracles.

Entry points: `generate_world(root, scale=..., seed=...)` writes the FashionIQ / CIRR / CIRCO layouts (read them with
recall_jax.data.readers); `Oracle(split.images)` describes, answers, edits and judges from the scene graphs.
"""

from recall_jax.data.synthetic.attributes import HELD_OUT, Garment, is_held_out
from recall_jax.data.synthetic.language import TextParseError, question
from recall_jax.data.synthetic.oracle import Oracle, answer, describe, edit, judge, load_scene_graph
from recall_jax.data.synthetic.world import LAYOUTS, SCALES, generate_world, load_manifest

__all__ = ["HELD_OUT", "Garment", "is_held_out", "TextParseError", "question", "Oracle", "answer", "describe", "edit",
           "judge", "load_scene_graph", "LAYOUTS", "SCALES", "generate_world", "load_manifest"]
