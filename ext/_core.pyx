# cython: language_level=3
"""deltaxfer._core: the compiled page core (hashing, deltas, frames, process memory).

Every kernel works on buffers with the GIL released; Python never loops over pages.
The Python-facing API with docs lives in ``deltaxfer.core``; each concern's wrappers
are in an ``ext/*.pxi`` file and its C declarations in the matching ``ext/dx_*.pxd``.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memset
from libc cimport errno as c_errno
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release, PyBUF_C_CONTIGUOUS,
                             PyBUF_FORMAT, PyBUF_WRITABLE)
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython cimport array
import array

from dx_common cimport *
from dx_hash cimport *
from dx_delta cimport *
from dx_frame cimport *
from dx_cache cimport *
from dx_procmem cimport *
from dx_pipeline cimport *
from dx_track cimport *
from dx_apply cimport *
from dx_applypool cimport *
from dx_lazy cimport *

cdef extern from "lz4.h":
    int LZ4_versionNumber() nogil

cdef extern from "xxhash.h":
    unsigned XXH_versionNumber() nogil
    unsigned long long XXH3_64bits_withSeed(const void *data, size_t len,
                                            unsigned long long seed) nogil

PAGE_SIZE = 4096


def lib_versions():
    """Versions of the system libraries the core was linked against."""
    cdef int lz4v = LZ4_versionNumber()
    cdef unsigned xxv = XXH_versionNumber()
    return {
        "lz4": f"{lz4v // 10000}.{lz4v // 100 % 100}.{lz4v % 100}",
        "xxhash": f"{xxv // 10000}.{xxv // 100 % 100}.{xxv % 100}",
    }


include "buffers.pxi"
include "hash.pxi"
include "delta.pxi"
include "frame.pxi"
include "cache.pxi"
include "procmem.pxi"
include "pipeline.pxi"
include "store.pxi"
include "apply.pxi"
include "applypool.pxi"
include "images.pxi"
include "track.pxi"
include "lazy.pxi"
