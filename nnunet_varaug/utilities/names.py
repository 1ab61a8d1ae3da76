"""Trainer names: the grammar of the plugin's suffixes, parsed and formatted in this one place.

nnU-Net finds a trainer by class name and names its result folder after it, so every replica has a name of its
own. Every module that reads or writes such a name goes through :func:`parse` and the formatters below
(:func:`replica_name`, :func:`varaug_name`); :mod:`nnunet_varaug.training.registry` builds the classes.

Grammar (suffixes read from the right; the rest is the base, itself any resolvable name)::

    <Base>_seed<K>                  seed replica K
    <Base>_mca<K>[_t<T>][_instr]    numerical replica K (noise stream K, T virtual bits, _instr: per instruction)
    <Base>_ieee                     the IEEE twin of the _mca replicas (their training path, no noise)
    <Base>_init<K>                  <Base>_seed0 with the network's initial weights from stream K
    <Base>_order<K>                 <Base>_seed0 with the batches' cases and patch locations from stream K
    <Base>_aug<K>                   <Base>_seed0 with the augmentation parameters from stream K
    <Base>_nondet<K>                <Base>_seed0 with non-deterministic GPU kernels (K labels the run; GPU only)
    <Base>_varaug[_p<NN>][_oof]     trained with variability samples, p = NN/100 (default 0.5); ``_oof``: from
                                    the out-of-fold sample set instead of the fold's own (in-fold) one
"""
from __future__ import annotations

import re
from importlib.metadata import entry_points
from typing import Dict, Optional, Tuple

ENTRY_POINT_GROUP = "nnunet_varaug.trainers"

GRAMMAR = (
    "trainer names follow <Base>_seed<K> | <Base>_mca<K>[_t<T>][_instr] | <Base>_ieee | "
    "<Base>_init<K> | <Base>_order<K> | <Base>_aug<K> | <Base>_nondet<K> | "
    "<Base>_varaug[_p<NN>][_oof], where <Base> is a "
    "trainer nnU-Net can find (built in, in an nnUNet_extTrainer folder, or in the entry-point group "
    f"'{ENTRY_POINT_GROUP}'), K is a non-negative integer without leading zeros, T is 1..24 virtual bits (float32 training), "
    "NN is 0..100 (p = NN/100), and names never contain '__'"
)

#: The one-source replicas' suffixes (``<Base>_init<K>`` ...): each changes one source of randomness of _seed0.
ONE_SOURCE_KINDS = ("init", "order", "aug", "nondet")

_SUFFIX_RULES = (
    ("seed", re.compile(r"^(?P<base>.+?)_seed(?P<k>0|[1-9]\d*)$")),
    ("mca", re.compile(r"^(?P<base>.+?)_mca(?P<k>0|[1-9]\d*)(?:_t(?P<t>[1-9]\d?))?(?P<instr>_instr)?$")),
    ("ieee", re.compile(r"^(?P<base>.+?)_ieee$")),
    *((kind, re.compile(rf"^(?P<base>.+?)_{kind}(?P<k>0|[1-9]\d*)$")) for kind in ONE_SOURCE_KINDS),
    ("varaug", re.compile(r"^(?P<base>.+?)_varaug(?:_p(?P<p>\d{1,3}))?(?P<oof>_oof)?$")),
)
# A name that contains one of these tokens claims to be ours; if no rule parses it, it is malformed. The one-source
# tokens count only when no letter follows (``MyTrainer_augmented`` stays the user's).
_TOKENS = re.compile(r"_(seed|mca|varaug|ieee)|_(init|order|aug|nondet)(?![A-Za-z])")

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
        if kind == "nondet":
            return base, kind, {"run": int(m.group("k"))}
        if kind in ONE_SOURCE_KINDS:
            return base, kind, {"stream": int(m.group("k"))}
        p = int(m.group("p")) if m.group("p") is not None else 50
        if p > 100:
            raise TrainerNameError(f"'{name}': p={p}/100 is outside [0, 1]; {GRAMMAR}")
        # "source" only for _oof, so that in-fold settings (and what older checkpoints recorded) stay as they were
        return base, kind, {"p": p / 100, **({"source": "out-of-fold"} if m.group("oof") else {})}
    if _TOKENS.search(name):
        raise TrainerNameError(f"'{name}' is not a valid trainer name: {GRAMMAR}")
    return None


def entry_point_names() -> Dict[str, object]:
    """The entry points of the group ``nnunet_varaug.trainers``, by name."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def claims(name: str) -> bool:
    """Whether ``name`` is one of ours (an entry point or uses our suffix tokens)."""
    return bool(_TOKENS.search(name)) or name in entry_point_names()


def replica_name(base: str, kind: str, k: int = 0, virtual_bits: Optional[int] = None,
                 granularity: str = "op") -> str:
    """The trainer name of replica ``k`` of ``kind`` over ``base``.

    Args:
        base: the base trainer name, e.g. ``nnUNetTrainer``.
        kind: 'seed' (``<base>_seed<k>``), 'mca' (``<base>_mca<k>[_t<T>][_instr]``), 'ieee' (``<base>_ieee``,
            the IEEE twin of the mca replicas; ``k`` is ignored), or a one-source kind, 'init', 'order', 'aug' or
            'nondet' (``<base>_<kind><k>``).
        k: the replica index (seed or noise stream).
        virtual_bits: 'mca' only: T, or None for float32's own 24 bits.
        granularity: 'mca' only: 'op' or 'instruction' (``_instr``).

    Raises:
        ValueError: an unknown kind or granularity, or settings the kind does not take.
        TrainerNameError: the resulting name breaks the grammar (e.g. T outside 1..24).
    """
    if kind not in ("seed", "mca", "ieee") + ONE_SOURCE_KINDS:
        raise ValueError(f"unknown replica kind '{kind}': use one of seed, mca, ieee, {', '.join(ONE_SOURCE_KINDS)}")
    if granularity not in ("op", "instruction"):
        raise ValueError(f"unknown granularity '{granularity}': use 'op' or 'instruction'")
    if kind != "mca" and (virtual_bits is not None or granularity != "op"):
        raise ValueError(f"virtual_bits and granularity apply to 'mca' replicas, not '{kind}'")
    if kind == "ieee":
        name = f"{base}_ieee"
    elif kind == "seed" or kind in ONE_SOURCE_KINDS:
        name = f"{base}_{kind}{int(k)}"
    else:
        name = (f"{base}_mca{int(k)}" + (f"_t{int(virtual_bits)}" if virtual_bits is not None else "")
                + ("_instr" if granularity == "instruction" else ""))
    parse(name)
    return name


def varaug_name(base: str, p: Optional[int] = None, source: str = "in-fold") -> str:
    """The name of ``base`` trained with variability samples: ``<base>_varaug[_p<NN>][_oof]``.

    Args:
        base: the base trainer name.
        p: the swap probability in percent, or None for the default (no ``_p`` suffix).
        source: 'in-fold' (the fold's own sample set) or 'out-of-fold' (``_oof``).
    """
    if source not in ("in-fold", "out-of-fold"):
        raise ValueError(f"unknown sample source '{source}': use 'in-fold' or 'out-of-fold'")
    name = f"{base}_varaug" + ("" if p is None else f"_p{int(p)}") + ("_oof" if source == "out-of-fold" else "")
    parse(name)
    return name
