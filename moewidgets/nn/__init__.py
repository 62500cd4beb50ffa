"""Neural-network pieces: the activation table, the pure MoE functions, expert banks, routers, the MoE layer and
its dense baselines.

Shape letters follow the course-wide alphabet of :mod:`moewidgets.shapes` (T tokens, D model width, F expert hidden
width, E experts, K top-k, S seeds, ...). Modules: ``activations`` (name → φ, φ', form), ``functional`` (expert
forwards, combines, router logits, routing, K-Means update; optional leading seed axis), ``experts`` (the
``ExpertBank`` contract and our banks), ``routers`` (softmax, MPI, K-Means), ``layer`` (``MoELayer``, ``DenseFFN``).
"""
from . import functional
from .activations import ACTIVATIONS, Activation, activation
from .experts import (ExpertBank, GatedExperts, GELUExperts, PlainExperts, ReLUExperts, SwiGLUExperts, bank_weights,
                      make_experts)
from .layer import DenseFFN, MoELayer, MoEOutput, choose_dispatch, make_layer
from .routers import KMeansRouter, MPIRouter, RouterOutput, SoftmaxRouter, make_router, select_topk

__all__ = ["functional", "ACTIVATIONS", "Activation", "activation", "ExpertBank", "PlainExperts", "GatedExperts",
           "GELUExperts", "ReLUExperts", "SwiGLUExperts", "bank_weights", "make_experts", "DenseFFN", "MoELayer",
           "MoEOutput", "choose_dispatch", "make_layer", "RouterOutput", "SoftmaxRouter", "KMeansRouter",
           "make_router", "select_topk", "MPIRouter"]
