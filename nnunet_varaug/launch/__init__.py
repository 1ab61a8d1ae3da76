"""Launch: where trainings run — logged subprocesses of nnU-Net's and the plugin's commands, this machine one after
another, one per GPU, or SLURM jobs.

May import: :mod:`nnunet_varaug.utilities`, :mod:`nnunet_varaug.training`.
"""
