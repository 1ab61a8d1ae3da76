"""The floating-point precision settings of a training step (the one job of this module): turn off TF32 and
read back every setting that decides how float32 convolutions and matrix products are computed.

On NVIDIA GPUs PyTorch may compute float32 convolutions (cuDNN) and matrix products with TF32 tensor cores,
whose inputs keep 10 significand bits: a rounding 2^13 times larger than float32's, which would drown a
24-bit perturbation. ``_mca`` and ``_ieee`` replicas therefore train with TF32 off; on the CPU these flags
change nothing, and they are recorded anyway.
"""
from __future__ import annotations

from typing import Any, Dict

import torch


def disable_tf32() -> None:
    """Full float32 for cuDNN convolutions and CUDA matrix products (process-wide, as nnU-Net's flags are)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def precision_settings() -> Dict[str, Any]:
    """Every process-wide setting that changes how float32 arithmetic is carried out, as JSON-able values."""
    return {
        "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_fp16_reduced_precision_reduction":
            bool(torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction),
        "cuda_matmul_allow_bf16_reduced_precision_reduction":
            bool(torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "mkldnn_enabled": bool(torch.backends.mkldnn.enabled),
        "torch": torch.__version__,
    }
