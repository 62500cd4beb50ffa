"""Neural-network pieces: expert banks, routers, the MoE layer and its dense baselines."""
from .experts import GELUExperts, SwiGLUExperts, make_experts
from .layer import DenseFFN, MoELayer, MoEOutput, choose_dispatch, make_layer
from .routers import MPIRouter, RouterOutput, SoftmaxRouter, make_router, select_topk

__all__ = ["GELUExperts", "SwiGLUExperts", "make_experts", "DenseFFN", "MoELayer", "MoEOutput", "choose_dispatch",
           "make_layer", "RouterOutput", "SoftmaxRouter", "make_router", "select_topk", "MPIRouter"]
