"""nn.Modules over the ops, one concept per file. Parameters never depend on
the backend, so a state_dict saved with one backend loads and runs with any
other."""
from .experts import Experts
from .mars import MarsConfig, MarsMoE, MarsRouter
from .routing import NoisyTopKRouter, Routing, TopKRouter, flatten_tokens
from .sparse_moe import SparseMoE

__all__ = ["Routing", "TopKRouter", "NoisyTopKRouter", "MarsConfig", "MarsRouter", "MarsMoE", "Experts", "SparseMoE", "flatten_tokens"]
