"""Training: all that runs inside ``nnUNetv2_train`` and its augmentation workers — the trainer classes and their
factory (``registry``), seeding, the variability-sample transform, stochastic-rounding numerics, the sample-set
format with its reader and checks, and the experiment (the replicas of one trainer on disk).

May import: :mod:`nnunet_varaug.utilities`.
"""
