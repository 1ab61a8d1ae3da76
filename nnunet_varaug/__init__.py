"""nnunet_varaug: seed and floating-point replicas of nnU-Net v2 models, their variability, and variability as data
augmentation (arXiv 2509.05238).

The package is laid out by role, each layer importing only the layers below it (docs/design.md)::

    cli.py        the console script
    commands/     one module per command
    experiments/  benchmark, downstream experiment, demo, synthetic datasets
    report/       tables, figures, maps, HTML          launch/   subprocesses, GPUs, SLURM
    inference/    predictor, ensemble engine, cached predictions, sample-set writer
    evaluation/   metrics on arrays                     training/ trainers, seeding, numerics, sample-set format
    utilities/    errors, files, paths, folds, trainer-name grammar

The two Python names the documentation shows are importable from here, lazily (importing the package imports
no torch): ``from nnunet_varaug import MonteCarloArithmetic, VariabilitySampleTransform``.
"""
__version__ = "0.3.0"


def __getattr__(name: str):
    if name == "MonteCarloArithmetic":
        from nnunet_varaug.training.numerics import MonteCarloArithmetic

        return MonteCarloArithmetic
    if name == "VariabilitySampleTransform":
        from nnunet_varaug.training.transforms import VariabilitySampleTransform

        return VariabilitySampleTransform
    raise AttributeError(f"module 'nnunet_varaug' has no attribute '{name}'")
