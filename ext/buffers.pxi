# Buffer access shared by every kernel (the numcodecs pattern): any object with the
# buffer protocol, C-contiguous, never copied; outputs sized once.

cdef array.array _U64_TEMPLATE = array.array("Q")
_U64_FORMATS = frozenset(["Q", "L", "<Q", "<L", "=Q", "=L", "@Q", "@L"])


cdef class _Buffer:
    """A held Py_buffer: pointer + length, released when the object goes away."""
    cdef Py_buffer view
    cdef bint held
    cdef uint8_t *ptr
    cdef size_t nbytes

    def __dealloc__(self):
        if self.held:
            PyBuffer_Release(&self.view)


cdef _Buffer _acquire(obj, str what, bint writable):
    cdef _Buffer b = _Buffer.__new__(_Buffer)
    cdef int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (PyBUF_WRITABLE if writable else 0)
    try:
        PyObject_GetBuffer(obj, &b.view, flags)
    except BufferError as e:
        need = "writable, C-contiguous" if writable else "C-contiguous"
        raise ValueError(f"{what} must be a {need} buffer ({e})") from None
    except TypeError:
        raise TypeError(f"{what} must support the buffer protocol, "
                        f"not {type(obj).__name__}") from None
    b.held = True
    b.ptr = <uint8_t *>b.view.buf
    b.nbytes = <size_t>b.view.len
    return b


cdef _Buffer pages_buffer(obj, str what, bint writable=False):
    """A page buffer: C-contiguous, length a multiple of the page size."""
    cdef _Buffer b = _acquire(obj, what, writable)
    if b.nbytes % DX_PAGE_SIZE:
        raise ValueError(f"{what}: length {b.nbytes} is not a multiple of the page size "
                         f"{DX_PAGE_SIZE}")
    return b


cdef _Buffer bytes_buffer(obj, str what, bint writable=False):
    return _acquire(obj, what, writable)


cdef _Buffer u64_buffer(obj, str what, bint writable=False):
    """An array of uint64 (array('Q'), numpy uint64, memoryview cast to 'Q')."""
    cdef _Buffer b = _acquire(obj, what, writable)
    fmt = b.view.format.decode() if b.view.format != NULL else "B"
    if b.view.itemsize != 8 or fmt not in _U64_FORMATS:
        raise ValueError(f"{what} must be a buffer of uint64 (array('Q')), "
                         f"got format {fmt!r} with item size {b.view.itemsize}")
    return b


cdef inline size_t u64_len(_Buffer b) noexcept nogil:
    return b.nbytes // 8


cdef inline uint64_t *u64_ptr(_Buffer b) noexcept nogil:
    return <uint64_t *>b.ptr


cdef array.array new_u64_array(size_t n):
    return array.clone(_U64_TEMPLATE, <Py_ssize_t>n, False)


cdef check_vaddrs(_Buffer vaddrs, str what):
    cdef int rc
    with nogil:
        rc = dx_check_vaddrs(u64_ptr(vaddrs), u64_len(vaddrs))
    if rc:
        raise ValueError(f"{what}: {dx_strerror(rc).decode()}")


cdef raise_core_error(int rc, str where):
    if rc == -DX_E_NOMEM:
        raise MemoryError(where)
    raise ValueError(f"{where}: {dx_strerror(rc).decode()}")
