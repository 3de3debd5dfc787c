# Page records in lz4 frames (ext/c/frame.c).

FRAME_HEADER_SIZE = DX_FRAME_HEADER_SIZE
FRAME_VERSION = DX_FRAME_VERSION
FRAME_FLAG_LZ4 = DX_FRAME_FLAG_LZ4
DEFAULT_FRAME_SIZE = DX_FRAME_DEFAULT_SIZE
FRAME_MAX_RAW = DX_FRAME_MAX_RAW
RECORD_HEADER_SIZE = DX_RECORD_HEADER_SIZE
RECORD_ZERO = DX_REC_ZERO
RECORD_XOR = DX_REC_XOR
RECORD_FULL = DX_REC_FULL


def _frame_error(msg):
    from deltaxfer.core.errors import FrameError
    return FrameError(msg)


cdef bytes _take_output(dx_frame_writer *w):
    cdef bytes out = PyBytes_FromStringAndSize(<char *>w.out, w.out_len) if w.out_len else b""
    w.out_len = 0
    return out


cdef check_frame_size(size_t frame_size):
    """The frame sizes dx_fw_init accepts (else it returns -DX_E_ARG)."""
    if frame_size < DX_RECORD_MAX or frame_size > DX_FRAME_MAX_RAW:
        raise ValueError(f"frame_size must be between {DX_RECORD_MAX} and "
                         f"{DX_FRAME_MAX_RAW} bytes, got {frame_size}")


cdef class FrameWriter:
    """Packs page records into frames of at most frame_size raw bytes, lz4-compressed."""
    cdef dx_frame_writer w

    def __cinit__(self, size_t frame_size=DX_FRAME_DEFAULT_SIZE, bint compress=True):
        check_frame_size(frame_size)
        if dx_fw_init(&self.w, frame_size, compress):
            raise MemoryError("FrameWriter")

    def __dealloc__(self):
        dx_fw_free(&self.w)

    cdef _add(self, uint64_t vaddr, int kind, const uint8_t *payload, size_t n):
        if vaddr % DX_PAGE_SIZE:
            raise ValueError(f"vaddr {vaddr:#x} is not page aligned")
        if dx_fw_add(&self.w, vaddr, kind, payload, n):
            raise MemoryError("FrameWriter")

    def add_zero(self, uint64_t vaddr):
        self._add(vaddr, DX_REC_ZERO, NULL, 0)

    def add_full(self, uint64_t vaddr, page):
        cdef _Buffer p = _one_page(page, "page")
        self._add(vaddr, DX_REC_FULL, p.ptr, p.nbytes)

    def add_xor(self, uint64_t vaddr, delta):
        cdef _Buffer d = bytes_buffer(delta, "delta")
        if d.nbytes < 1 or d.nbytes >= DX_PAGE_SIZE:
            raise ValueError(f"an xor delta record holds 1..{DX_PAGE_SIZE - 1} bytes, "
                             f"got {d.nbytes}")
        if dx_xor_validate(d.ptr, d.nbytes):
            raise _delta_error("xor delta is malformed")
        self._add(vaddr, DX_REC_XOR, d.ptr, d.nbytes)

    def finish(self):
        """Close the current frame; return every frame written so far, back to back."""
        if dx_fw_flush(&self.w):
            raise MemoryError("FrameWriter")
        return _take_output(&self.w)

    @property
    def stats(self):
        return {"frames": self.w.frames, "records": self.w.records,
                "raw_bytes": self.w.raw_bytes, "stored_bytes": self.w.stored_bytes}


cdef dx_frame_header _parse_header(const uint8_t *p, size_t n, size_t max_raw,
                                   size_t offset) except *:
    cdef dx_frame_header h
    cdef int rc = dx_frame_header_parse(p, n, max_raw, &h)
    if rc:
        detail = ""
        if rc == -DX_E_FRAME_TOO_LARGE:
            detail = f": {h.raw_len} > {min(max_raw, DX_FRAME_MAX_RAW)}"
        elif rc == -DX_E_FRAME_TRUNCATED and n >= <size_t>DX_FRAME_HEADER_SIZE:
            detail = f": payload needs {h.stored_len} bytes, {n - DX_FRAME_HEADER_SIZE} present"
        elif rc == -DX_E_FRAME_TRUNCATED:
            detail = f": header needs {DX_FRAME_HEADER_SIZE} bytes, {n} present"
        raise _frame_error(f"frame at byte {offset}: {dx_strerror(rc).decode()}{detail}")
    return h


def read_frame_header(buf, size_t max_raw=DX_FRAME_MAX_RAW):
    """The checked header of the frame at the start of buf, as a dict."""
    cdef _Buffer b = bytes_buffer(buf, "frame")
    cdef dx_frame_header h = _parse_header(b.ptr, b.nbytes, max_raw, 0)
    return {"flags": h.flags, "record_count": h.record_count, "raw_len": h.raw_len,
            "stored_len": h.stored_len, "checksum": h.checksum,
            "frame_len": DX_FRAME_HEADER_SIZE + h.stored_len}


def decode_frame(buf, size_t max_raw=DX_FRAME_MAX_RAW):
    """Decode the frame at the start of buf: returns (records, frame_len).

    records is a list of (vaddr, kind, payload bytes).  Raises FrameError naming what is
    wrong for a truncated or corrupt frame.
    """
    cdef _Buffer b = bytes_buffer(buf, "frame")
    cdef dx_frame_header h = _parse_header(b.ptr, b.nbytes, max_raw, 0)
    cdef bytearray raw = bytearray(h.raw_len)
    cdef uint8_t *rp = <uint8_t *>raw if h.raw_len else NULL
    cdef int rc
    with nogil:
        rc = dx_frame_decode(b.ptr, &h, rp)
    if rc:
        raise _frame_error(f"frame at byte 0: {dx_strerror(rc).decode()}")
    records = []
    cdef size_t p = 0, plen
    cdef uint64_t vaddr
    mv = memoryview(raw)
    while p < h.raw_len:
        memcpy(&vaddr, rp + p, 8)
        plen = rp[p + 9] | (rp[p + 10] << 8)
        records.append((vaddr, rp[p + 8], bytes(mv[p + DX_RECORD_HEADER_SIZE:
                                                 p + DX_RECORD_HEADER_SIZE + plen])))
        p += DX_RECORD_HEADER_SIZE + plen
    return records, DX_FRAME_HEADER_SIZE + h.stored_len


def apply_frames(frames, pages, vaddrs, size_t max_raw=DX_FRAME_MAX_RAW):
    """Apply frames (back to back) to a page store: pages[i] holds vaddrs[i].

    Returns counts per record kind.  Each frame is checked whole (checksum, records,
    vaddrs known) before it touches a page; earlier frames stay applied on error.
    """
    cdef _Buffer fb = bytes_buffer(frames, "frames")
    cdef _Buffer pb = pages_buffer(pages, "pages", True)
    cdef _Buffer vb = u64_buffer(vaddrs, "vaddrs")
    cdef size_t n = u64_len(vb)
    if n * DX_PAGE_SIZE != pb.nbytes:
        raise ValueError(f"pages holds {pb.nbytes // DX_PAGE_SIZE} pages but vaddrs has {n}")
    check_vaddrs(vb, "vaddrs")
    cdef uint64_t counts[3]
    cdef size_t err_offset = 0
    cdef uint64_t err_vaddr = 0
    cdef int rc
    counts[0] = counts[1] = counts[2] = 0
    with nogil:
        rc = dx_apply_frames(fb.ptr, fb.nbytes, pb.ptr, u64_ptr(vb), n, max_raw, counts,
                             &err_offset, &err_vaddr)
    if rc == -DX_E_NOMEM:
        raise MemoryError("apply_frames")
    if rc == -DX_E_UNKNOWN_VADDR:
        raise _frame_error(f"frame at byte {err_offset}: {dx_strerror(rc).decode()} "
                           f"({err_vaddr:#x})")
    if rc:
        if rc == -DX_E_FRAME_TOO_LARGE or rc == -DX_E_FRAME_TRUNCATED:
            _parse_header(fb.ptr + err_offset, fb.nbytes - err_offset, max_raw, err_offset)
        raise _frame_error(f"frame at byte {err_offset}: {dx_strerror(rc).decode()}")
    return {"zero": counts[0], "xor": counts[1], "full": counts[2]}
