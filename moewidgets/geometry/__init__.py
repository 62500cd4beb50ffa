"""Geometry probes of MoE layers (chapter 1, book/chapter1.ipynb): exact Jacobians, their spectra, weighted PCA and
effective ranks, cross-expert alignment with its null and ceiling, and the chapter-1 probe bundle.

Geometry takes expert banks (the contract attributes of ``moewidgets.nn.experts``), plain tensors and routing
traces, never a whole model (the one exception, :func:`layer_jacobian`, needs the router and the gate
convention). It never imports widgets or bokeh.
"""
from .alignment import (GELUBankView, JacobianAlignment, SwiGLUBankView, bank_jacobian_alignment,
                        dense_pseudo_experts, frobenius_cosine, jacobian_alignment, make_generator)
from .jacobians import (dense_jacobian, expert_jacobians, expert_outputs, gelu_grad, layer_jacobian,
                        mean_expert_jacobians, pair_jacobians, silu_grad)
from .pca import EFFECTIVE_RANK_KINDS, WeightedPCA, effective_rank, expert_pca, weighted_pca
from .probes import WEIGHTINGS, Chapter1Probes, chapter1_probes
from .mpi import (RowAlignment, power_iterate, power_step, random_direction_lambda, riemannian_ascent_step,
                  row_alignment, top_singular)
from .spectra import SpectrumStats, WeightedSpectra, singular_values, spectrum_stats, weighted_expert_spectra

__all__ = [
    "expert_jacobians", "pair_jacobians", "mean_expert_jacobians", "expert_outputs", "layer_jacobian",
    "dense_jacobian", "gelu_grad", "silu_grad",
    "singular_values", "spectrum_stats", "weighted_expert_spectra", "SpectrumStats", "WeightedSpectra",
    "weighted_pca", "expert_pca", "effective_rank", "WeightedPCA", "EFFECTIVE_RANK_KINDS",
    "jacobian_alignment", "bank_jacobian_alignment", "frobenius_cosine", "dense_pseudo_experts",
    "JacobianAlignment", "GELUBankView", "SwiGLUBankView", "make_generator",
    "chapter1_probes", "Chapter1Probes", "WEIGHTINGS",
    "row_alignment", "RowAlignment", "top_singular", "riemannian_ascent_step", "power_step", "power_iterate",
    "random_direction_lambda",
]
