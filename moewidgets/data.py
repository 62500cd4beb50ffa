"""Data: the synthetic clustered-teacher task of chapter 1 (WikiText-2 lives in ``moewidgets.wikitext``).

Shape legend: N points, D input width, O output width, C clusters, H teacher hidden width.

Paper-1 spec §1.3.2 (a [PROPOSAL] of ours, sizes scaled to a CPU): inputs from a Gaussian mixture
``x = μ_c + noise·ε`` with ``μ_c ~ N(0, s² I)``, targets ``y = T_c(x) = A_c tanh(B_c x + β_c)`` with one random
tanh teacher per cluster (or one shared teacher, the no-structure control). Chapter 3 adds a shared offset μ to
every input (``TaskConfig.offset``), as real residual streams have.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import TaskConfig

__all__ = ["TaskData", "make_task"]


@dataclass
class TaskData:
    """A drawn task. ``x_train`` (N, D), ``y_train`` (N, O), ``c_train`` (N,) cluster ids; the same for probe."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    c_train: torch.Tensor
    x_probe: torch.Tensor
    y_probe: torch.Tensor
    c_probe: torch.Tensor
    cfg: TaskConfig

    def to(self, device) -> "TaskData":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return TaskData(**moved)


#: Points per chunk of the teacher evaluation: the per-point teacher weights are gathered ``DRAW_CHUNK`` points at
#: a time (``DRAW_CHUNK·H·D`` numbers, 32 MiB at the defaults) instead of ``N·H·D`` at once (134 MB at the default
#: n_train, linear in n_train). Each point's value is the same batched product as before, so the data are bitwise
#: those of the unchunked draw (a test compares them); a per-cluster matmul would change the last bits.
DRAW_CHUNK = 4096


def _draw(cfg: TaskConfig, n: int, means_CD, teachers, g: torch.Generator, chunk: int = DRAW_CHUNK):
    c_N = torch.randint(cfg.n_clusters, (n,), generator=g)
    x_ND = means_CD[c_N] + cfg.noise * torch.randn(n, cfg.d_in, generator=g)
    B_CHD, beta_CH, A_COH = teachers
    t_N = torch.zeros_like(c_N) if cfg.shared_teacher else c_N
    y_NO = torch.empty(n, A_COH.shape[1], dtype=x_ND.dtype)
    for s in range(0, n, chunk):           # y_n = A_{t_n} tanh(B_{t_n} x_n + β_{t_n}), chunk points at a time
        t_n, x_nD = t_N[s:s + chunk], x_ND[s:s + chunk]
        h_nH = torch.tanh(torch.einsum("nhd,nd->nh", B_CHD[t_n], x_nD) + beta_CH[t_n])
        y_NO[s:s + chunk] = torch.einsum("noh,nh->no", A_COH[t_n], h_nH)
    return x_ND, y_NO, c_N


def make_task(cfg: TaskConfig = TaskConfig(), seed: int = 0) -> TaskData:
    """Draw the clustered-teacher task from ``seed`` with its own ``torch.Generator``.

    Teacher weights are N(0, 1/fan_in), so targets have O(1) scale. The same seed gives the same data for every
    architecture ("identical input distributions", paper 1).

    >>> d = make_task(TaskConfig(n_train=100, n_probe=10), seed=0)
    >>> d.x_train.shape, d.y_probe.shape
    (torch.Size([100, 32]), torch.Size([10, 32]))
    """
    g = torch.Generator().manual_seed(1_000_003 * seed + 17)
    C, D, O, H = cfg.n_clusters, cfg.d_in, cfg.d_out, cfg.teacher_width
    means_CD = cfg.cluster_scale * torch.randn(C, D, generator=g)
    # teacher pre-activations of O(1): scale by the input's per-coordinate std √(s² + noise²), so the tanh
    # teachers are smooth functions rather than saturated sign functions (ours; the spec leaves this open)
    in_std = (cfg.cluster_scale ** 2 + cfg.noise ** 2) ** 0.5
    B_CHD = torch.randn(C, H, D, generator=g) / (D ** 0.5 * max(in_std, 1e-12))
    beta_CH = 0.1 * torch.randn(C, H, generator=g)
    A_COH = torch.randn(C, O, H, generator=g) / H ** 0.5
    teachers = (B_CHD, beta_CH, A_COH)
    x_tr, y_tr, c_tr = _draw(cfg, cfg.n_train, means_CD, teachers, g)
    x_pr, y_pr, c_pr = _draw(cfg, cfg.n_probe, means_CD, teachers, g)
    if cfg.offset > 0:
        # its own generator, so offset = 0 draws exactly the data of before; targets stay T_c(x − μ)
        g_mu = torch.Generator().manual_seed(1_000_003 * seed + 29)
        mu_D = torch.randn(D, generator=g_mu)
        mu_D = mu_D / mu_D.norm() * cfg.offset * cfg.cluster_scale * D ** 0.5
        x_tr, x_pr = x_tr + mu_D, x_pr + mu_D
    return TaskData(x_tr, y_tr, c_tr, x_pr, y_pr, c_pr, cfg)
