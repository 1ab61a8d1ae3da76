"""The one module nnU-Net imports from the nnUNet_extTrainer folder of nnunet_varaug.

nnU-Net asks ``hasattr(module, name)`` for the trainer it looks for. We answer for names that are ours
(entry points, or the ``_seed``/``_mca``/``_ieee``/``_varaug`` grammar of :mod:`nnunet_varaug.utilities.names`) and raise AttributeError for any other name, so
that nnU-Net keeps searching. A malformed name of ours raises an error that states the grammar. nnU-Net
removes this module from ``sys.modules`` after the lookup, so it stays thin: the classes live in
``nnunet_varaug.training.registry``.
"""
from nnunet_varaug.utilities import names
from nnunet_varaug.training import registry as _registry


def __getattr__(name):
    if name.startswith("__") or not names.claims(name):
        raise AttributeError(name)
    return _registry.resolve(name)
