"""Trainer names: the grammar, entry points, and the class factory.

nnU-Net finds a trainer by class name, and names its result folder after it, so every replica needs a class
of its own. This module turns a name such as ``nnUNetTrainer_seed3`` into a class built on demand from the
base trainer ``nnUNetTrainer`` and the mixin for ``_seed3``. Classes are built once per name and cached; they
live (for pickle) as attributes of this module, resolved by the module ``__getattr__`` below.

Grammar (suffixes read from the right; the rest is the base, itself any resolvable name)::

    <Base>_seed<K>                  seed replica K
    <Base>_mca<K>[_t<T>][_instr]    numerical replica K (noise stream K, T virtual bits, _instr: per instruction)
    <Base>_ieee                     the IEEE twin of the _mca replicas (their training path, no noise)
    <Base>_varaug[_p<NN>][_oof]     trained with variability samples, p = NN/100 (default 0.5); ``_oof``: from
                                    the out-of-fold sample set instead of the fold's own (in-fold) one
"""
from __future__ import annotations

import os
import re
import threading
from importlib.metadata import entry_points
from typing import Dict, Optional, Tuple

ENTRY_POINT_GROUP = "nnunet_varaug.trainers"
LOOKUP_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_lookup")

GRAMMAR = (
    "trainer names follow <Base>_seed<K> | <Base>_mca<K>[_t<T>][_instr] | <Base>_ieee | "
    "<Base>_varaug[_p<NN>][_oof], where <Base> is a "
    "trainer nnU-Net can find (built in, in an nnUNet_extTrainer folder, or in the entry-point group "
    f"'{ENTRY_POINT_GROUP}'), K is a non-negative integer without leading zeros, T is 1..24 virtual bits (float32 training), "
    "NN is 0..100 (p = NN/100), and names never contain '__'"
)

_SUFFIX_RULES = (
    ("seed", re.compile(r"^(?P<base>.+?)_seed(?P<k>0|[1-9]\d*)$")),
    ("mca", re.compile(r"^(?P<base>.+?)_mca(?P<k>0|[1-9]\d*)(?:_t(?P<t>[1-9]\d?))?(?P<instr>_instr)?$")),
    ("ieee", re.compile(r"^(?P<base>.+?)_ieee$")),
    ("varaug", re.compile(r"^(?P<base>.+?)_varaug(?:_p(?P<p>\d{1,3}))?(?P<oof>_oof)?$")),
)
# A name that contains one of these tokens claims to be ours; if no rule parses it, it is malformed.
_TOKENS = re.compile(r"_(seed|mca|varaug|ieee)")

_cache: Dict[str, type] = {}
_lock = threading.RLock()


class TrainerNameError(ValueError):
    """A trainer name that is malformed or whose base cannot be found (not an AttributeError on purpose:
    nnU-Net's lookup must stop and show it instead of silently searching on)."""


def parse(name: str) -> Optional[Tuple[str, str, dict]]:
    """Split ``name`` into ``(base, kind, settings)``, or None if it carries none of our suffixes.

    Raises:
        TrainerNameError: the name uses one of our suffixes but breaks the grammar.
    """
    if "__" in name:
        raise TrainerNameError(f"'{name}' contains '__', which nnU-Net uses to separate folder parts; {GRAMMAR}")
    for kind, rule in _SUFFIX_RULES:
        m = rule.match(name)
        if m is None:
            continue
        base = m.group("base")
        if kind == "seed":
            return base, kind, {"seed": int(m.group("k"))}
        if kind == "mca":
            bits = int(m.group("t")) if m.group("t") else None
            if bits is not None and not 1 <= bits <= 24:
                raise TrainerNameError(f"'{name}': virtual precision t={bits} is outside 1..24; {GRAMMAR}")
            settings = {"stream": int(m.group("k")), "virtual_bits": bits}
            if m.group("instr"):
                settings["granularity"] = "instruction"
            return base, kind, settings
        if kind == "ieee":
            return base, kind, {}
        p = int(m.group("p")) if m.group("p") is not None else 50
        if p > 100:
            raise TrainerNameError(f"'{name}': p={p}/100 is outside [0, 1]; {GRAMMAR}")
        # "source" only for _oof, so that in-fold settings (and what older checkpoints recorded) stay as they were
        return base, kind, {"p": p / 100, **({"source": "out-of-fold"} if m.group("oof") else {})}
    if _TOKENS.search(name):
        raise TrainerNameError(f"'{name}' is not a valid trainer name: {GRAMMAR}")
    return None


def _entry_point_classes() -> Dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


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
    ep = _entry_point_classes().get(name)
    return ep.load() if ep is not None else None


def _mixin_for(kind: str) -> type:
    if kind == "seed":
        from nnunet_varaug.trainers.replica import SeedReplicaMixin
        return SeedReplicaMixin
    if kind == "mca":
        from nnunet_varaug.trainers.mca import MCAReplicaMixin
        return MCAReplicaMixin
    if kind == "ieee":
        from nnunet_varaug.trainers.ieee import IEEEReplicaMixin
        return IEEEReplicaMixin
    from nnunet_varaug.trainers.varaug import VarAugMixin
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
        ep = _entry_point_classes().get(name)
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


def claims(name: str) -> bool:
    """Whether ``name`` is one of ours (an entry point or uses our suffix tokens)."""
    return bool(_TOKENS.search(name)) or name in _entry_point_classes()


def replica_name(base: str, kind: str, k: int = 0, virtual_bits: Optional[int] = None,
                 granularity: str = "op") -> str:
    """The trainer name of replica ``k`` of ``kind`` over ``base``.

    Args:
        base: the base trainer name, e.g. ``nnUNetTrainer``.
        kind: 'seed' (``<base>_seed<k>``), 'mca' (``<base>_mca<k>[_t<T>][_instr]``) or 'ieee' (``<base>_ieee``,
            the IEEE twin of the mca replicas; ``k`` is ignored).
        k: the replica index (seed or noise stream).
        virtual_bits: 'mca' only: T, or None for float32's own 24 bits.
        granularity: 'mca' only: 'op' or 'instruction' (``_instr``).

    Raises:
        ValueError: an unknown kind or granularity, or settings the kind does not take.
        TrainerNameError: the resulting name breaks the grammar (e.g. T outside 1..24).
    """
    if kind not in ("seed", "mca", "ieee"):
        raise ValueError(f"unknown replica kind '{kind}': use 'seed', 'mca' or 'ieee'")
    if granularity not in ("op", "instruction"):
        raise ValueError(f"unknown granularity '{granularity}': use 'op' or 'instruction'")
    if kind != "mca" and (virtual_bits is not None or granularity != "op"):
        raise ValueError(f"virtual_bits and granularity apply to 'mca' replicas, not '{kind}'")
    if kind == "ieee":
        name = f"{base}_ieee"
    elif kind == "seed":
        name = f"{base}_seed{int(k)}"
    else:
        name = (f"{base}_mca{int(k)}" + (f"_t{int(virtual_bits)}" if virtual_bits is not None else "")
                + ("_instr" if granularity == "instruction" else ""))
    parse(name)
    return name


def ext_trainer_value(current: Optional[str] = None) -> str:
    """The nnUNet_extTrainer value with our folder appended (last, so the user's own folders win),
    keeping every folder already listed and never listing ours twice."""
    current = os.environ.get("nnUNet_extTrainer", "") if current is None else current
    ours = os.path.realpath(LOOKUP_FOLDER)
    folders = [p for p in current.split(os.pathsep) if p.strip() and os.path.realpath(p) != ours]
    return os.pathsep.join(folders + [LOOKUP_FOLDER])


def __getattr__(name: str):
    """Make built classes importable as ``nnunet_varaug.registry.<name>`` so pickle finds them."""
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return resolve(name)
    except TrainerNameError as e:
        raise AttributeError(str(e)) from None
