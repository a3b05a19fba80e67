"""The parameter dtypes a config or a recall_config.json may name (config model.dtype)."""

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
