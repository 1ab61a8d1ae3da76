"""Experiments: whole studies built from the layers below — the Medical Segmentation Decathlon benchmark, the
paper's downstream regression experiment, the demo, and the synthetic datasets tests and the demo use.

May import: every layer below (utilities, training, evaluation, inference, launch, report).
"""
