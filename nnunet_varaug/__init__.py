"""nnunet_varaug: seed replicas of nnU-Net v2 models, their variability, and variability as data augmentation."""
__version__ = "0.1.0"
