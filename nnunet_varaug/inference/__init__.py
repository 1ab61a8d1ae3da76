"""Inference: replicas predicting images — nnU-Net's predictor built once per replica, the replica ensemble engine,
the cached replica predictions of ``analyze``, the sample-set writer (one for both sources), the cases a command
reads, and the probability sums kept for vote ties.

May import: :mod:`nnunet_varaug.utilities`, :mod:`nnunet_varaug.training`, :mod:`nnunet_varaug.evaluation`.
"""
