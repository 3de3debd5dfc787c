"""Reference of the bounded XOR cache (ext/c/cache.h): 4-way set-associative by vaddr,
the way inserted longest ago is evicted, pages sent as zero are dropped."""
from ._buffers import PAGE_SIZE, one_page

XOR_CACHE_WAYS = 4
SLOT_OVERHEAD = 16
DEFAULT_XOR_CACHE_BYTES = 64 * 1024 * 1024
_MASK64 = (1 << 64) - 1


class XorCache:
    def __init__(self, capacity_bytes: int = DEFAULT_XOR_CACHE_BYTES):
        nsets = capacity_bytes // ((PAGE_SIZE + SLOT_OVERHEAD) * XOR_CACHE_WAYS)
        if nsets == 0:
            raise ValueError(f"capacity_bytes {capacity_bytes} holds no set of "
                             f"{XOR_CACHE_WAYS} pages")
        self.nsets = nsets
        self.slots = nsets * XOR_CACHE_WAYS
        self.nbytes = self.slots * (PAGE_SIZE + 12)
        self.tags = [0] * self.slots
        self.rounds = [0] * self.slots
        self.pages = [None] * self.slots
        self.round = 0
        self._stats = dict.fromkeys(["hits", "misses", "inserts", "evictions", "drops"], 0)

    def _set_base(self, vaddr: int) -> int:
        h = ((vaddr >> 12) * 0x9E3779B97F4A7C15) & _MASK64
        return ((h * self.nsets) >> 64) * XOR_CACHE_WAYS

    def _find(self, vaddr: int):
        base = self._set_base(vaddr)
        for i in range(base, base + XOR_CACHE_WAYS):
            if self.tags[i] == vaddr | 1:
                return i
        return None

    def lookup(self, vaddr: int):
        i = self._find(vaddr)
        self._stats["hits" if i is not None else "misses"] += 1
        return None if i is None else self.pages[i]

    def insert(self, vaddr: int, page) -> None:
        page = bytes(one_page(page, "page"))
        if vaddr % PAGE_SIZE:
            raise ValueError(f"vaddr {vaddr:#x} is not page aligned")
        i = self._find(vaddr)
        if i is None:
            base = self._set_base(vaddr)
            i = base
            for w in range(base, base + XOR_CACHE_WAYS):
                if not self.tags[w]:
                    i = w
                    break
                if self.rounds[w] < self.rounds[i]:
                    i = w
            if self.tags[i]:
                self._stats["evictions"] += 1
            self.tags[i] = vaddr | 1
        self.rounds[i] = self.round
        self.pages[i] = page
        self._stats["inserts"] += 1

    def drop(self, vaddr: int) -> None:
        i = self._find(vaddr)
        if i is not None:
            self.tags[i], self.pages[i] = 0, None
            self._stats["drops"] += 1

    def next_round(self) -> None:
        self.round += 1

    def __len__(self) -> int:
        return sum(1 for t in self.tags if t)

    @property
    def stats(self):
        return dict(self._stats)
