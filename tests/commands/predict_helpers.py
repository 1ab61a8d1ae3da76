"""What the predict tests (test_predict.py, test_predict_folds.py, test_predict_regions.py) share: the command run
in this process, and a label map read as an array."""
from __future__ import annotations

import SimpleITK as sitk


def arr(path):
    """The image at ``path`` as a numpy array (SimpleITK's axis order)."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def main(args):
    """``nnunet_varaug <args>`` in this process; torch's thread count restored afterwards."""
    import torch

    from nnunet_varaug.cli import main as cli_main

    threads = torch.get_num_threads()
    try:
        return cli_main(args)
    finally:
        torch.set_num_threads(threads)
