"""Dense peak FLOP/s of common GPUs, for ``ThroughputMonitor``'s MFU.

The values are the vendors' data-sheet figures for dense math (the "with sparsity" figures
halved where a sheet gives only those), per GPU, at boost clock. ``bf16`` / ``fp16`` are the
tensor-core rates with FP32 accumulation (what PyTorch uses); ``tf32`` is the tensor-core rate
of FP32 matrix products when TF32 is allowed; ``fp32`` the plain FP32 rate. A missing entry
means the GPU has no fast path for that type (MFU is then not logged).

The A10G (AWS) has no NVIDIA data sheet; it takes the A10's figures, an upper bound.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch

TERA = 1e12


class Peaks(NamedTuple):
    """Dense FLOP/s of one GPU per number format (None: no fast path)."""

    bf16: float | None
    fp16: float | None
    tf32: float | None
    fp32: float


# (pattern on the upper-cased torch.cuda.get_device_name(), peaks). First match wins: the
# more specific names (H100 NVL / PCIe, A10G, L40S) come before the general ones.
PEAKS: tuple[tuple[str, Peaks], ...] = (
    (r"\bH200\b.*\bNVL\b", Peaks(835.5 * TERA, 835.5 * TERA, 417.5 * TERA, 60 * TERA)),
    (r"\bH200\b", Peaks(989.5 * TERA, 989.5 * TERA, 494.5 * TERA, 67 * TERA)),
    (r"\bH100\b.*\bNVL\b", Peaks(835.5 * TERA, 835.5 * TERA, 417.5 * TERA, 60 * TERA)),
    (r"\bH100\b.*\bPCIE\b", Peaks(756.5 * TERA, 756.5 * TERA, 378 * TERA, 51 * TERA)),
    (r"\bH100\b", Peaks(989.5 * TERA, 989.5 * TERA, 494.5 * TERA, 67 * TERA)),  # SXM
    (r"\bA100\b", Peaks(312 * TERA, 312 * TERA, 156 * TERA, 19.5 * TERA)),
    (r"\bA10G?\b", Peaks(125 * TERA, 125 * TERA, 62.5 * TERA, 31.2 * TERA)),
    (r"\bL40S\b", Peaks(362 * TERA, 362 * TERA, 183 * TERA, 91.6 * TERA)),
    (r"\bL40\b", Peaks(181 * TERA, 181 * TERA, 90.5 * TERA, 90.5 * TERA)),
    (r"\bL4\b", Peaks(121 * TERA, 121 * TERA, 60 * TERA, 30.3 * TERA)),
    (r"\bRTX 4090\b", Peaks(165.2 * TERA, 165.2 * TERA, 82.6 * TERA, 82.6 * TERA)),
    (r"\bRTX 3090 TI\b", Peaks(80 * TERA, 80 * TERA, 40 * TERA, 40 * TERA)),
    (r"\bRTX 3090\b", Peaks(71 * TERA, 71 * TERA, 35.6 * TERA, 35.6 * TERA)),
    (r"\bV100S\b", Peaks(None, 130 * TERA, None, 16.4 * TERA)),
    (r"\bV100\b.*\bPCIE\b", Peaks(None, 112 * TERA, None, 14 * TERA)),
    (r"\bV100\b", Peaks(None, 125 * TERA, None, 15.7 * TERA)),  # SXM2
    (r"\bT4\b", Peaks(None, 65 * TERA, None, 8.1 * TERA)),
)


def peaks_of(device_name: str) -> Peaks | None:
    """The table's entry for a device name (``torch.cuda.get_device_name()``), or None."""
    name = device_name.upper()
    return next((peaks for pattern, peaks in PEAKS if re.search(pattern, name)), None)


def peak_flops(device_name: str, precision: str, tf32: bool) -> float | None:
    """Dense peak FLOP/s of ``device_name`` for a precision, in the Trainer's spelling
    ("32-true", "16-mixed", "bf16-mixed", "bf16-true") or the Accelerator's ("no", "fp16",
    "bf16"); ``tf32``: whether FP32 matrix products may use TF32. None when the device or
    its rate for that precision is not known."""
    peaks = peaks_of(device_name)
    if peaks is None:
        return None
    if precision.startswith("bf16"):
        return peaks.bf16
    if precision in ("16-mixed", "fp16"):
        return peaks.fp16
    return peaks.tf32 if tf32 and peaks.tf32 is not None else peaks.fp32


def tf32_allowed() -> bool:
    """Whether CUDA FP32 matrix products may run in TF32 (PyTorch's setting)."""
    return bool(torch.backends.cuda.matmul.allow_tf32)


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """Dense peak FLOP/s of ``device`` (one GPU) at ``precision``; None on a CPU or a GPU
    missing from the table."""
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device), precision, tf32_allowed())
