"""The trainer-class factory: a name of :mod:`nnunet_varaug.utilities.names`' grammar turned into a class.

nnU-Net finds a trainer by class name, so every replica needs a class of its own. This module builds, for a name
such as ``nnUNetTrainer_seed3``, the class of base trainer ``nnUNetTrainer`` and the mixin for ``_seed3``, once
per name, and caches it; the classes live (for pickle) as attributes of this module, resolved by the module
``__getattr__`` below. It also holds the ``nnUNet_extTrainer`` folder through which nnU-Net finds them.
"""
from __future__ import annotations

import os
import threading
from typing import Dict, Optional

from nnunet_varaug.utilities.names import GRAMMAR, ONE_SOURCE_KINDS, TrainerNameError, entry_point_names, parse

LOOKUP_FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_lookup")

_cache: Dict[str, type] = {}
_lock = threading.RLock()


def _other_ext_folders() -> list:
    """The user's own nnUNet_extTrainer folders, without ours (searching ours would recurse)."""
    ours = os.path.realpath(LOOKUP_FOLDER)
    folders = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p.strip()]
    return [p for p in folders if os.path.isdir(p) and os.path.realpath(p) != ours]


def find_plain_trainer(name: str) -> Optional[type]:
    """Find a trainer the way nnU-Net does (built in, then the user's ext folders), then in entry points."""
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    folder = os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer")
    cls = recursive_find_python_class(folder, name, "nnunetv2.training.nnUNetTrainer", nnunetv2.__path__[0])
    if cls is not None:
        return cls
    for path in _other_ext_folders():
        cls = recursive_find_python_class(path, name, None, base_folder=path,
                                          cleanup_imports_from_base_folder=True)
        if cls is not None:
            return cls
    ep = entry_point_names().get(name)
    return ep.load() if ep is not None else None


def _mixin_for(kind: str) -> type:
    if kind == "seed":
        from nnunet_varaug.training.trainers.replica import SeedReplicaMixin
        return SeedReplicaMixin
    if kind == "mca":
        from nnunet_varaug.training.trainers.mca import MCAReplicaMixin
        return MCAReplicaMixin
    if kind == "ieee":
        from nnunet_varaug.training.trainers.ieee import IEEEReplicaMixin
        return IEEEReplicaMixin
    if kind in ONE_SOURCE_KINDS:
        from nnunet_varaug.training.trainers import one_source
        return {"init": one_source.InitReplicaMixin, "order": one_source.OrderReplicaMixin,
                "aug": one_source.AugReplicaMixin, "nondet": one_source.NondetReplicaMixin}[kind]
    from nnunet_varaug.training.trainers.varaug import VarAugMixin
    return VarAugMixin


def _build(name: str, base_cls: type, kind: str, settings: dict) -> type:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    if not (isinstance(base_cls, type) and issubclass(base_cls, nnUNetTrainer)):
        raise TrainerNameError(f"'{name}': base {base_cls!r} is not an nnUNetTrainer subclass")
    mixin = _mixin_for(kind)
    inherited = dict(getattr(base_cls, "varaug_settings", {}) or {})
    inherited.update({f"{kind}": settings})
    attrs = {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"{base_cls.__name__} with suffix '{name[len(base_cls.__name__):]}' (built by nnunet_varaug).",
        "varaug_settings": inherited,
        "varaug_base_name": base_cls.__name__,
    }
    attrs.update(mixin.class_attributes(settings))
    return type(name, (mixin, base_cls), attrs)


def resolve(name: str) -> type:
    """Return the trainer class for ``name`` (entry point or grammar), building and caching it once.

    Raises:
        TrainerNameError: malformed name or unknown base, with the grammar in the message.
    """
    with _lock:
        if name in _cache:
            return _cache[name]
        ep = entry_point_names().get(name)
        if ep is not None:
            cls = ep.load()
        else:
            parsed = parse(name)
            if parsed is None:
                cls = find_plain_trainer(name)
                if cls is None:
                    raise TrainerNameError(f"unknown trainer '{name}': nnU-Net cannot find it; {GRAMMAR}")
            else:
                base, kind, settings = parsed
                try:
                    base_cls = resolve(base)
                except TrainerNameError as e:
                    raise TrainerNameError(f"'{name}': its base '{base}' cannot be resolved ({e})") from None
                cls = _build(name, base_cls, kind, settings)
        _cache[name] = cls
        return cls


def ext_trainer_value(current: Optional[str] = None) -> str:
    """The nnUNet_extTrainer value with our folder appended (last, so the user's own folders win),
    keeping every folder already listed and never listing ours twice."""
    current = os.environ.get("nnUNet_extTrainer", "") if current is None else current
    ours = os.path.realpath(LOOKUP_FOLDER)
    folders = [p for p in current.split(os.pathsep) if p.strip() and os.path.realpath(p) != ours]
    return os.pathsep.join(folders + [LOOKUP_FOLDER])


def __getattr__(name: str):
    """Make built classes importable as ``nnunet_varaug.training.registry.<name>`` so pickle finds them."""
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return resolve(name)
    except TrainerNameError as e:
        raise AttributeError(str(e)) from None
