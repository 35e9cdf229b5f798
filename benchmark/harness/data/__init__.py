"""Omniglot: finding the sources, decoding them once into a 28x28 uint8 cache, and the split files."""

from benchmark.harness.data.omniglot import OmniglotImages, load_omniglot
from benchmark.harness.data.sources import Sources, cache_root, find_sources

__all__ = ["OmniglotImages", "Sources", "cache_root", "find_sources", "load_omniglot"]
