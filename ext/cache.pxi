# The bounded cache of last-sent page versions (ext/c/cache.c).

XOR_CACHE_WAYS = DX_CACHE_WAYS
DEFAULT_XOR_CACHE_BYTES = 64 * 1024 * 1024


cdef class XorCache:
    """Last-sent version of pages, keyed by vaddr, the XOR base for deltas.

    capacity_bytes bounds all of its memory (pages + tags + one lock byte per set),
    allocated once here. Thread-safe per page: encode_round on several threads may share
    one cache (each set is locked while one of its pages is looked up, XOR-encoded
    against and replaced), as long as the threads encode disjoint vaddrs; next_round
    only between rounds, while no thread uses it.
    """
    cdef dx_xor_cache c

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
        return &self.c

    cdef void release(self):
        pass

    def lookup(self, uint64_t vaddr):
        """The cached page for vaddr as bytes, or None."""
        cdef uint8_t *p
        dx_cache_lock(&self.c, vaddr)
        try:
            p = dx_cache_lookup(&self.c, vaddr)
            return None if p == NULL else PyBytes_FromStringAndSize(<char *>p, DX_PAGE_SIZE)
        finally:
            dx_cache_unlock(&self.c, vaddr)

    def insert(self, uint64_t vaddr, page):
        cdef _Buffer b = _one_page(page, "page")
        if vaddr % DX_PAGE_SIZE:
            raise ValueError(f"vaddr {vaddr:#x} is not page aligned")
        cdef const uint8_t *pp = b.ptr
        with nogil:
            dx_cache_lock(&self.c, vaddr)
            dx_cache_insert(&self.c, vaddr, pp)
            dx_cache_unlock(&self.c, vaddr)

    def drop(self, uint64_t vaddr):
        with nogil:
            dx_cache_lock(&self.c, vaddr)
            dx_cache_drop(&self.c, vaddr)
            dx_cache_unlock(&self.c, vaddr)

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
