"""Keep freed buffers inside the process: glibc malloc tuning for processes that move bulk bytes.

A transfer allocates and frees buffers per chunk (file reads, TLS records, WebSocket frames). By default
glibc serves allocations above its mmap threshold (128 KiB, adapting upwards) with fresh pages, and gives
the top of the heap back to the kernel whenever more than the trim threshold is free there, so a chunk
that is freed and allocated again costs a page fault per 4 KiB. Measured on the 2-core development VM
(Firecracker): copying 1 MiB into a fresh buffer took 1.1 ms instead of 0.05 ms, and the core, the agent
and ``port-forward`` each spent about a third of their CPU per tunnelled byte on such faults
(bench/remote_transfer.py, docs/performance.md). Raising both thresholds keeps those pages in the
process: at most :data:`TRIM_THRESHOLD` of freed memory stays resident.

Used by ``skyport agent``, ``skyport port-forward`` and ``skyport server``; a no-op where the C library is
not glibc (``mallopt`` missing or refusing).
"""

from __future__ import annotations

import ctypes
import sys

#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Allocations below this come from the heap (glibc's ceiling for it is 32 MiB on 64-bit).
MMAP_THRESHOLD = 16 * 1024 * 1024
#: Freed memory kept at the top of the heap before any is returned to the kernel.
TRIM_THRESHOLD = 64 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Tune this process's malloc as described above; True if it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
