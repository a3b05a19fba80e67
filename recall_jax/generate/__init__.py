"""Text generation with the Flax Qwen2.5-VL: jitted prefill + KV-cache decode loop, sampling, candidate scoring."""

from recall_jax.generate.sampler import GenerateOutput, Sampler, ScoreOutput
from recall_jax.generate.sampling import GREEDY, SamplingConfig

__all__ = ["GREEDY", "GenerateOutput", "Sampler", "SamplingConfig", "ScoreOutput"]
