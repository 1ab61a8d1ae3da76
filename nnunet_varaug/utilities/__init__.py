"""Utilities: what every layer needs and nothing of nnU-Net's training — user errors, atomic file writes and
fingerprints, paths on disk and the nnU-Net environment, folds and held-out splits, the trainer-name grammar (parse
and format names), and nnU-Net's process pools run in this process.

May import: the standard library and third-party packages only (no other layer of nnunet_varaug).
"""
