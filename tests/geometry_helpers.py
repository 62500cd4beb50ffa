"""Helpers the geometry tests share (float64 draws from seeded generators, float64 expert banks)."""
from __future__ import annotations

import torch

from moewidgets.nn.experts import make_experts

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, scale=1.0):
    return scale * torch.randn(*shape, generator=gen(seed), dtype=F64)


def bank64(kind, E, D, F, seed=0):
    return make_experts(kind, E, D, F, gen(seed), F64)
