"""``nnunet_varaug env``: the export line that lets nnU-Net find the plugin's trainers (imports no torch)."""
from __future__ import annotations

import argparse
import shlex

from nnunet_varaug.training.registry import ext_trainer_value


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.description = 'Use as: eval "$(nnunet_varaug env)"'


def run(args: argparse.Namespace) -> int:
    print(f"export nnUNet_extTrainer={shlex.quote(ext_trainer_value())}")
    return 0
