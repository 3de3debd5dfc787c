"""Buffer checks of the reference, matching the compiled core's."""
from array import array

PAGE_SIZE = 4096
U64_FORMATS = frozenset(["Q", "L", "<Q", "<L", "=Q", "=L", "@Q", "@L"])


def byte_view(obj, what: str, writable: bool = False) -> memoryview:
    mv = memoryview(obj)
    if not mv.c_contiguous:
        raise ValueError(f"{what} must be a C-contiguous buffer")
    if writable and mv.readonly:
        raise ValueError(f"{what} must be a writable, C-contiguous buffer")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def page_view(obj, what: str, writable: bool = False) -> memoryview:
    mv = byte_view(obj, what, writable)
    if len(mv) % PAGE_SIZE:
        raise ValueError(f"{what}: length {len(mv)} is not a multiple of the page size {PAGE_SIZE}")
    return mv


def one_page(obj, what: str, writable: bool = False) -> memoryview:
    mv = page_view(obj, what, writable)
    if len(mv) != PAGE_SIZE:
        raise ValueError(f"{what} must be exactly one page ({PAGE_SIZE} bytes), got {len(mv)}")
    return mv


def u64_list(obj, what: str) -> memoryview:
    mv = memoryview(obj)
    if mv.itemsize != 8 or mv.format not in U64_FORMATS:
        raise ValueError(f"{what} must be a buffer of uint64 (array('Q')), "
                         f"got format {mv.format!r} with item size {mv.itemsize}")
    return mv.cast("B").cast("Q")


def check_vaddrs(vaddrs, what: str) -> None:
    prev = None
    for v in vaddrs:
        if v % PAGE_SIZE:
            raise ValueError(f"{what}: vaddr is not page aligned")
        if prev is not None and v <= prev:
            raise ValueError(f"{what}: vaddrs are not strictly ascending")
        prev = v


def u64_array(values=()) -> array:
    return array("Q", values)
