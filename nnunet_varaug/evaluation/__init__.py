"""Evaluation: pure metrics on arrays — pairwise Dice, Dice to a reference, majority vote and entropy, volume
spread and significant digits, ensemble uncertainty, calibration counts. No file of nnU-Net's is read here.

May import: :mod:`nnunet_varaug.utilities`.
"""
