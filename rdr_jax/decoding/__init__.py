"""Generative retrieval decoding: passage identifiers, their prefix trie, and trie-constrained beam search."""

from rdr_jax.decoding.beam_search import constrained_beam_search
from rdr_jax.decoding.identifiers import PassageIdentifiers
from rdr_jax.decoding.trie import DeviceTrie, PrefixTrie

__all__ = ["PrefixTrie", "DeviceTrie", "PassageIdentifiers", "constrained_beam_search"]
