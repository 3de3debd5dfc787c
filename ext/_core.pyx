# cython: language_level=3
"""deltaxfer._core: the compiled page core (hashing, deltas, frames, process memory).

Every kernel works on buffers with the GIL released; Python never loops over pages.
"""

cdef extern from "lz4.h":
    int LZ4_versionNumber() nogil

cdef extern from "xxhash.h":
    unsigned XXH_versionNumber() nogil

PAGE_SIZE = 4096


def lib_versions():
    """Versions of the system libraries the core was linked against."""
    cdef int lz4v = LZ4_versionNumber()
    cdef unsigned xxv = XXH_versionNumber()
    return {
        "lz4": f"{lz4v // 10000}.{lz4v // 100 % 100}.{lz4v % 100}",
        "xxhash": f"{xxv // 10000}.{xxv // 100 % 100}.{xxv % 100}",
    }
