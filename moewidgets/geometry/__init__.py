"""Geometry probes of MoE layers: exact Jacobians, their spectra, weighted PCA and effective ranks, cross-expert
alignment with its null and ceiling, and the chapter-1 probe bundle (chapter 1); Grassmann distances of routed
subspaces and the functional-vs-representational asymmetry (chapter 2); router–expert coupling
(``moewidgets.geometry.coupling``, chapter 3); router-to-singular-vector alignment (chapter 4).

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
from .subspaces import (GRASSMANN_KINDS, ROUTING_WEIGHTINGS, SUBSPACE_METRICS, RoutedSubspaces, SubspaceComparison,
                        SubspaceReferences, compare_subspaces, grassmann_distance, metric_from_angles,
                        principal_angles, routed_subspaces, routing_weights, subspace_distance_matrix,
                        subspace_overlap, subspace_references, trace_subspaces)
from .asymmetry import (ALIGNMENT_PATHS, AsymmetrySummary, CoselectedCosine, LayerAsymmetry, PairAlignment,
                        asymmetry_summary, coselected_jacobian_cosine, layer_asymmetry, pair_alignment)

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
    "principal_angles", "grassmann_distance", "subspace_overlap", "metric_from_angles", "GRASSMANN_KINDS",
    "SUBSPACE_METRICS", "ROUTING_WEIGHTINGS", "routing_weights", "RoutedSubspaces", "routed_subspaces",
    "trace_subspaces", "subspace_distance_matrix", "SubspaceReferences", "subspace_references",
    "SubspaceComparison", "compare_subspaces",
    "PairAlignment", "pair_alignment", "CoselectedCosine", "coselected_jacobian_cosine", "AsymmetrySummary",
    "asymmetry_summary", "LayerAsymmetry", "layer_asymmetry", "ALIGNMENT_PATHS",
]
