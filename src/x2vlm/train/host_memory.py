"""The C allocator's policy for host (CPU) memory: the one place that calls glibc's ``mallopt`` and
``malloc_trim``.

A training or evaluation step allocates and frees the same large tensors every step (activations,
gradients, weight casts under autocast). By default glibc serves every request above its mmap
threshold (128 KiB, growing to at most 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``, and
it trims the heap's free top; the next step then takes a page fault on every 4 KiB page of memory it
already had. On the 2-core machines this project is measured on that costs about a microsecond or
more per page: zeroing a fresh 94 MB tensor (BERT's word-embedding gradient) took 38-95 ms against
3 ms for the same tensor reused, and a base pre-training step (issue 10's W1, bf16) took 3.46 s
against 2.98 s with these settings given through glibc's environment variables (median of 5 each,
same machine and hour; the README's *Benchmarks* has the A/B of this function: 200,000-290,000 page
faults per step before, 1 after). ``reuse_freed_memory`` keeps freed memory for the next request.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# glibc takes the trim threshold as a size_t: -1 becomes SIZE_MAX, "never trim on free". A positive int
# caps it at 2 GiB, under the activations one base pre-training step frees at once (2.4 GB in fp32).
NEVER = -1

OPT_OUT = "X2VLM_SYSTEM_MALLOC"  # set to 1 to leave the C allocator as it is


def _glibc() -> ctypes.CDLL | None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        if libc.gnu_get_libc_version and libc.mallopt and libc.malloc_trim:
            return libc
    return None


def reuse_freed_memory() -> bool:
    """Make glibc serve large requests from its heap (no ``mmap`` per tensor) and keep what is freed
    for the next request instead of returning it to the system at once. Process-wide; called by the
    command line and the benchmarks, not on import. The resident size then stays at the run's peak
    (it does not grow past it: the same requests recur every step). Returns whether it applied: not
    with another C library, nor when the environment sets ``X2VLM_SYSTEM_MALLOC=1``."""
    if os.environ.get(OPT_OUT, "") not in ("", "0"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, NEVER) == 1 and ok
    if not ok:
        log.debug("mallopt refused the settings; the C allocator keeps its defaults")
    return ok


def release_free_memory() -> None:
    """Hand the C allocator's free heap memory back to the system (glibc ``malloc_trim``; nothing
    elsewhere): memory freed by earlier work otherwise stays resident and counts in the next peak."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
