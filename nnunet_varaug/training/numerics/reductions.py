"""Per-instruction routes of the training step's other reductions (the one job of this module): normalisation
statistics, softmax, losses and norms under ``granularity="instruction"``.
"""
from __future__ import annotations

ROUTES = {}
