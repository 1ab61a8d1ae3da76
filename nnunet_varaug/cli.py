"""``nnunet_varaug`` and its subcommands.

Each subcommand is one module of :mod:`nnunet_varaug.commands` with ``configure_parser(parser)`` and
``run(args) -> int``; this file maps names to modules and imports only the one being run, so that
``nnunet_varaug env`` does not import torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

COMMANDS = {
    "env": "print the export line that lets nnU-Net find the plugin's trainers",
    "replicas": "train K replicas of one configuration and fold (resumable)",
    "samples": "write the replicas' label maps of the training cases (variability samples)",
    "analyze": "predict with each replica and write the variability report",
    "predict": "segment new images with the replicas: consensus, uncertainty maps, review list",
    "compare": "is trainer B better than trainer A beyond seed noise? (K seed replicas of each)",
    "sources": "which source of randomness drives the replicas' disagreement, per structure",
    "downstream": "the paper's augmentation experiment on per-replica features",
    "benchmark": "the Medical Segmentation Decathlon benchmark, stage by stage",
    "demo": "the whole pipeline on a built-in synthetic dataset, on the CPU",
}


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet_varaug",
        description="Seed replicas of nnU-Net v2 models, their variability, and variability as data augmentation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only == name:  # import only the module of the command being run
            mod = importlib.import_module(f"nnunet_varaug.commands.{name}")
            mod.configure_parser(p)
            p.set_defaults(func=mod.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from nnunet_varaug.utilities.errors import VarAugError

    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(only=command if command in COMMANDS else None).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VarAugError as e:
        print(f"nnunet_varaug {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
