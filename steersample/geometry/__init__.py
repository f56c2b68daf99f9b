"""Geometry diagnostics: local dimension (geometric memorisation) and log-density ridges.

    from steersample import geometry
    res = geometry.local_dimension(denoise_fn, x, sigma)   # x: (1, *shape)
    res.singular_values, res.dimension                     # spectrum of (1 - σ)·∂x̂₀/∂x, count > 0.5
    denoise_fn = geometry.as_denoiser(oracle_or_pipeline_or_transformer, labels=3)
    proj = geometry.project_to_ridge(reference, x, sigma, dim=1, labels=3)
    parts = geometry.decompose_error(v_hat - v_star, proj)  # normal + tangential
    trace = geometry.ridge_trace(denoise_fn, reference, noise, sigmas, label=3)  # reach/align/slide

``local_dimension`` follows Achilli et al. (arXiv 2410.08727, SCIENCE.md §2); the ridge of the
Gaussian-smoothed reference set and the reach / align / slide picture follow He, Qiu & Tao
(arXiv 2602.06021, SCIENCE.md §4).
"""

from __future__ import annotations

from steersample.geometry.adapters import OracleDenoiser, VelocityDenoiser, as_denoiser
from steersample.geometry.local_dimension import (DenoiseFn, LocalDimension, jacobian_matrix,
                                                  local_dimension)
from steersample.geometry.ridge import (ErrorDecomposition, RidgeFrame, RidgeProjection,
                                        decompose_error, project_to_ridge, ridge_frame)
from steersample.geometry.trace import RidgeTrace, ridge_trace

__all__ = [
    "DenoiseFn",
    "ErrorDecomposition",
    "LocalDimension",
    "OracleDenoiser",
    "RidgeFrame",
    "RidgeProjection",
    "RidgeTrace",
    "VelocityDenoiser",
    "as_denoiser",
    "decompose_error",
    "jacobian_matrix",
    "local_dimension",
    "project_to_ridge",
    "ridge_frame",
    "ridge_trace",
]
