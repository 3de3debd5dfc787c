# The bounded cache of last-sent page versions (ext/c/cache.c).

XOR_CACHE_WAYS = DX_CACHE_WAYS
DEFAULT_XOR_CACHE_BYTES = 64 * 1024 * 1024


cdef class XorCache:
    """Last-sent version of pages, keyed by vaddr, the XOR base for deltas.

    capacity_bytes bounds all of its memory (pages + tags), allocated once here.
    Not thread-safe: use one cache per shard; using one from two threads at once
    raises RuntimeError instead of corrupting it.
    """
    cdef dx_xor_cache c
    cdef bint busy

    def __cinit__(self, size_t capacity_bytes=DEFAULT_XOR_CACHE_BYTES):
        cdef int rc = dx_cache_init(&self.c, capacity_bytes)
        if rc == -DX_E_ARG:
            raise ValueError(f"capacity_bytes {capacity_bytes} holds no set of "
                             f"{DX_CACHE_WAYS} pages")
        if rc:
            raise MemoryError(f"XorCache of {capacity_bytes} bytes")

    def __dealloc__(self):
        dx_cache_free(&self.c)

    cdef dx_xor_cache *acquire(self) except NULL:
        if self.busy:
            raise RuntimeError("XorCache is in use by another thread; use one cache per shard")
        self.busy = True
        return &self.c

    cdef void release(self):
        self.busy = False

    def lookup(self, uint64_t vaddr):
        """The cached page for vaddr as bytes, or None."""
        cdef uint8_t *p = dx_cache_lookup(self.acquire(), vaddr)
        self.release()
        return None if p == NULL else PyBytes_FromStringAndSize(<char *>p, DX_PAGE_SIZE)

    def insert(self, uint64_t vaddr, page):
        cdef _Buffer b = _one_page(page, "page")
        if vaddr % DX_PAGE_SIZE:
            raise ValueError(f"vaddr {vaddr:#x} is not page aligned")
        dx_cache_insert(self.acquire(), vaddr, b.ptr)
        self.release()

    def drop(self, uint64_t vaddr):
        dx_cache_drop(self.acquire(), vaddr)
        self.release()

    def next_round(self):
        """Start a new round: entries inserted from now on are younger than all before."""
        self.c.round += 1

    def __len__(self):
        return dx_cache_count(&self.c)

    @property
    def round(self):
        return self.c.round

    @property
    def slots(self):
        return self.c.nslots

    @property
    def nbytes(self):
        """Bytes allocated for pages and metadata (never more than capacity_bytes)."""
        return self.c.nbytes

    @property
    def stats(self):
        return {"hits": self.c.hits, "misses": self.c.misses, "inserts": self.c.inserts,
                "evictions": self.c.evictions, "drops": self.c.drops}
