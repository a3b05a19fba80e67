"""Readers for the FashionIQ, CIRR and CIRCO file layouts (real or synthetic) -> validated `CIRSplit`s."""

from recall_jax.data.readers.circo import read_circo
from recall_jax.data.readers.cirr import read_cirr
from recall_jax.data.readers.fashioniq import read_fashioniq

__all__ = ["read_circo", "read_cirr", "read_fashioniq"]
