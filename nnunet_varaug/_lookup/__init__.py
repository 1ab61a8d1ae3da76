"""The folder that ``nnunet_varaug env`` puts on nnUNet_extTrainer; it holds one module, nothing else."""
