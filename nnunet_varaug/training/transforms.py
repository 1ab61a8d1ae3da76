"""``VariabilitySampleTransform``: swap a replica's label map in for the ground truth, per training sample.

The segmentation reaching this transform holds the ground truth in channel 0 and K variability samples (label
maps of K replicas, see ``nnunet_varaug.training.sampleset``) in channels 1..K, all moved together by nnU-Net's spatial
augmentation and mirroring. The transform keeps the ground truth with probability 1 - p, else one replica chosen
uniformly, and returns a single channel, so everything after it (region conversion, deep-supervision
downsampling, the loss) sees an ordinary one-channel target.

Following batchgeneratorsv2, ``get_parameters`` draws all randomness and ``_apply_to_segmentation`` is
deterministic given it. Exactly two uniforms are drawn from numpy's global generator per sample whatever p and K
are, so that pipelines with different p or K consume the same random stream (the alignment test relies on it).
numpy, not torch: batchgenerators seeds numpy in every augmentation worker, while forked workers inherit one torch
state, which would give every worker the same sequence of choices.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import SegOnlyTransform


class VariabilitySampleTransform(SegOnlyTransform):
    """Segmentation ``(1 + K, *spatial)`` -> ``(1, *spatial)``: the ground truth or one of K replica maps.

    Args:
        p: probability of replacing the ground truth by a replica map, in [0, 1].
        num_samples: K, the number of replica channels after the ground truth (>= 1).

    Raises:
        ValueError: p outside [0, 1] or not finite, K < 1, or (when applied) a segmentation without 1 + K channels.
    """

    def __init__(self, p: float, num_samples: int):
        super().__init__()
        try:
            p = float(p)
        except (TypeError, ValueError):
            raise ValueError(f"p must be a number in [0, 1], got {p!r}") from None
        if not math.isfinite(p) or not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1] (probability of training on a replica's map), got {p}")
        if isinstance(num_samples, bool) or int(num_samples) != num_samples or int(num_samples) < 1:
            raise ValueError(f"num_samples (K, the number of replica maps) must be an integer >= 1, got "
                             f"{num_samples!r}; with no samples there is nothing to swap in: train without _varaug")
        self.p = p
        self.num_samples = int(num_samples)

    def get_parameters(self, **data_dict) -> dict:
        """Draw the channel to keep: 0 (ground truth) with probability 1 - p, else 1 + k, k uniform in 0..K-1."""
        u = np.random.random_sample(2)
        if float(u[0]) < self.p:
            k = min(int(float(u[1]) * self.num_samples), self.num_samples - 1)
            return {"channel": 1 + k}
        return {"channel": 0}

    def _apply_to_segmentation(self, segmentation: torch.Tensor, channel: int = 0, **params) -> torch.Tensor:
        expected = 1 + self.num_samples
        if segmentation.shape[0] != expected:
            raise ValueError(f"VariabilitySampleTransform expects a segmentation with 1 + K = {expected} channels "
                             f"(ground truth + {self.num_samples} replica maps), got shape "
                             f"{tuple(segmentation.shape)}")
        return segmentation[channel:channel + 1].clone()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, num_samples={self.num_samples})"
