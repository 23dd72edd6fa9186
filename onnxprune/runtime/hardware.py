"""What the machine's kernels want of a pruned model: the channel multiple that keeps ONNX Runtime on its
fast convolution and GEMM paths (``--round-to auto``).

ONNX Runtime's CPU convolutions (MLAS NCHWc) work on blocks of 8 channels with AVX2 and 16 with AVX-512; a
layer left with a count off the block is padded or falls back to a slower kernel, so a plan rounded to 1
can make a model slower than the dense one. CUDA's tensor cores want multiples of 8.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

__all__ = ["channel_multiple"]


def channel_multiple(provider: str = "cpu") -> tuple[int, str]:
    """(the channel multiple for ``provider``, why), for this machine."""
    if provider == "cuda":
        return 8, "CUDA tensor cores work on multiples of 8 channels"
    flags = _cpu_flags()
    if "avx512f" in flags:
        return 16, "this CPU has AVX-512: ONNX Runtime's convolutions work on blocks of 16 channels"
    if "avx2" in flags:
        return 8, "this CPU has AVX2: ONNX Runtime's convolutions work on blocks of 8 channels"
    return 8, f"{platform.machine() or 'this CPU'}: blocks of 8 channels suit its vector kernels"


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where that cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.partition(":")[2].split())
    return frozenset()
