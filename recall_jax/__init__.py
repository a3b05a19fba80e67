"""recall_jax: ReCALL composed image retrieval with multimodal LLM retrievers in JAX / Flax NNX."""
import os

# transformers is used here only for tokenizers, configs and image processors, never for models, so its
# "PyTorch was not found" advice at import is noise in a JAX job. Set before anything imports transformers.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
