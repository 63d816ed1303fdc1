"""Give freed tensor memory back to the operating system (glibc), for a device's peak memory.

torch's CPU tensors come from malloc. glibc serves a block of at least M_MMAP_THRESHOLD
(128 KiB at start) with its own mmap and unmaps it on free, but its threshold is dynamic:
each time such a block is freed, the threshold rises to that block's size (up to 32 MiB on
64-bit; glibc malloc(3), mallopt(3) "M_MMAP_THRESHOLD"). After the first few freed
activations, every later activation, logit chunk or dequantized weight slice below 32 MiB
is carved from the heap instead, and freed heap memory stays resident in fragments:
measured on a SmolLM2 DP-SGD step (BENCHMARKS.md, "Phone memory"), the process peak rose
by ~600 MiB over the same step with the threshold fixed. Setting the threshold explicitly
switches the dynamic adjustment off (mallopt(3)), so every block of 128 KiB or more is
mapped and returned when freed; the cost is a page fault per touched page of each new
block, which is not small: measured 9.1 -> 25.5 s per DP-SGD step (BENCHMARKS.md, "Phone
memory"; 2 shared cores), so only the phone profile sets it (model.return-freed-memory).
Elsewhere (musl, macOS, Windows) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
THRESHOLD = 128 * 1024  # glibc's initial M_MMAP_THRESHOLD, now fixed


def return_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds at 128 KiB for this process; False where there is no glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # mallopt returns 1 on success; both calls switch off glibc's dynamic thresholds
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))


def trim_freed_memory() -> bool:
    """Hand the heap's free pages back now (glibc malloc_trim(3)): after training, before evaluation.

    With the fixed thresholds above, large blocks are already unmapped when freed; what a
    DP-SGD round leaves behind are many small freed blocks (autograd nodes, Opacus' per-layer
    activations and backprops lists) spread over heap pages that the evaluation then does not
    reuse. False where there is no glibc.
    """
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False
