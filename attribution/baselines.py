"""Compatibility module: the baselines now live in :mod:`attribution.trak` (TRAK / D-TRAK) and
:mod:`attribution.similarity` (CLIP and pixel cosine). Existing ``attribution.baselines.X``
imports keep working; new code imports from those modules.

Note: patching a name here (``monkeypatch.setattr(baselines, ...)``) does not change what the
real modules call; patch it in :mod:`attribution.trak` / :mod:`attribution.similarity`.
"""

from __future__ import annotations

from attribution.similarity import (  # noqa: F401
    CLIP_WEIGHTS_ENV,
    DEFAULT_CLIP_MODEL,
    DEFAULT_CLIP_PRETRAINED,
    ClipUnavailable,
    ClipWeights,
    check_query_images,
    clip_embeddings,
    clip_scores,
    clip_train_embeddings,
    cosine_matrix,
    load_clip,
    pixel_scores,
    resolve_clip_weights,
)
from attribution.trak import (  # noqa: F401
    DEFAULT_NUM_DRAWS,
    DEFAULT_NUM_TIMESTEPS,
    DEFAULT_PROJ_DIM,
    DEFAULT_RELATIVE_DAMPING,
    QUERY_INDEX_OFFSET,
    TRAK_VARIANTS,
    GramEigen,
    TrakResult,
    TrakSettings,
    dtrak_timesteps,
    featurize,
    gram_eigen,
    query_features,
    query_keys,
    scores_from_features,
    train_features,
    trak_attribution,
    trak_code_damping,
    trak_scores,
)

__all__ = [
    "CLIP_WEIGHTS_ENV", "ClipUnavailable", "ClipWeights", "DEFAULT_CLIP_MODEL", "DEFAULT_CLIP_PRETRAINED",
    "DEFAULT_NUM_DRAWS", "DEFAULT_NUM_TIMESTEPS", "DEFAULT_PROJ_DIM", "DEFAULT_RELATIVE_DAMPING", "GramEigen",
    "QUERY_INDEX_OFFSET", "TRAK_VARIANTS", "TrakResult", "TrakSettings", "check_query_images", "clip_embeddings",
    "clip_scores", "clip_train_embeddings", "cosine_matrix", "dtrak_timesteps", "featurize", "gram_eigen",
    "load_clip", "pixel_scores", "query_features", "query_keys", "resolve_clip_weights", "scores_from_features",
    "train_features", "trak_attribution", "trak_code_damping", "trak_scores",
]
