"""Write the seed corpus of the fuzz harnesses into tests/fuzz_corpus/{wire,images}/.

Wire seeds: a valid stream of every message kind, and each frame alone. Image seeds:
synthetic pagemaps (CRIU 4.1 and 4.2 field layouts), page frames and XOR deltas from the
compiled core, and, given a CRIU dump directory (`python fuzz/make_corpus.py DUMP`), its
real pagemap, pstree, core, mm and inventory images. The first byte of an image seed
selects the harness target (see fuzz/fuzz_images.py)."""
import hashlib
import os
import sys
from array import array

from deltaxfer import PAGE_SIZE, _core, wire
from deltaxfer.criu import images as im
from deltaxfer.wire import MsgType as T

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fuzz_corpus")


def put(kind: str, data: bytes) -> None:
    d = os.path.join(ROOT, kind)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()[:16]), "wb") as f:
        f.write(data)


def wire_seeds():
    msgs = [
        (T.HELLO, wire.encode_control(T.HELLO, {"protocol": "deltaxfer", "versions": [1],
                                                "caps": ["lz4", "xor"], "nonce": "ab" * 32,
                                                "software": "seed"})),
        (T.WELCOME, wire.encode_control(T.WELCOME, {"version": 1, "caps": ["lz4"],
                                                    "nonce": "cd" * 32, "proof": "ef" * 32})),
        (T.AUTH, wire.encode_control(T.AUTH, {"proof": "01" * 32})),
        (T.READY, wire.encode_control(T.READY, {"session_limit": 8})),
        (T.BEGIN, wire.encode_control(T.BEGIN, {"session": "s1", "mode": "migrate", "source": "h",
                                                "images": [{"id": "pid-1"}, {"id": "shmem-7"}]})),
        (T.ROUND, wire.encode_control(T.ROUND, {"round": 1, "final": True})),
        (T.IMAGE, wire.encode_control(T.IMAGE, {"index": 0, "id": "pid-1", "entries": 2,
                                                "pages": 3})),
        (T.PAGEMAP, wire.encode_pagemap(0, [0x400000, 0x800000], [1, 2], [4, 6])),
        (T.HELD, wire.encode_held(0, [0x400000, 0x401000], [1, 2])),
        (T.PAGES, wire.encode_pages(0, frame_seed(lz4=True))),
        (T.PAGES, wire.encode_pages(0, frame_seed(lz4=False))),
        (T.IMAGE_END, wire.encode_control(T.IMAGE_END, {"index": 0, "digest": "0" * 16})),
        (T.FILE, wire.encode_control(T.FILE, {"name": "core-1.img", "size": 5, "mode": 384})),
        (T.FILE_DATA, b"hello"),
        (T.FILE_END, wire.encode_control(T.FILE_END, {"xxh3": "1" * 16})),
        (T.COMMIT, wire.encode_control(T.COMMIT, {"restore": True})),
        (T.ERROR, wire.encode_control(T.ERROR, {"code": "quota", "reason": "full"})),
        (T.CLOSE, b"{}"),
    ]
    stream = b"".join(wire.encode(t, p, i) for i, (t, p) in enumerate(msgs))
    for step in (0, 1, 7, 255):
        put("wire", bytes([step]) + stream)
    for t, p in msgs:
        put("wire", b"\x00" + wire.encode(t, p, 0))


def frame_seed(lz4: bool) -> bytes:
    pages = bytearray(4 * PAGE_SIZE)
    pages[PAGE_SIZE:PAGE_SIZE + 100] = b"x" * 100
    pages[3 * PAGE_SIZE:] = bytes(range(256)) * 16
    vaddrs = array("Q", [0x10000 + i * PAGE_SIZE for i in range(4)])
    out, _, _ = _core.encode_round(bytes(pages), vaddrs, compress=lz4)
    return bytes(out)


def image_seeds(dump: str | None):
    pm = im.Pagemap(1, [im.PagemapEntry(0x400000, 2, im.PE_PRESENT),
                        im.PagemapEntry(0x600000, 1, im.PE_PRESENT | im.PE_LAZY),
                        im.PagemapEntry(0x700000, 3, im.PE_PARENT)])
    put("images", b"\x00" + im.encode_pagemap(pm))
    put("images", b"\x00" + im.encode_pagemap_py(pm))
    # CRIU 4.2 layout: nr_pages in field 5, field 2 left at 0
    from deltaxfer.criu import protobuf as pb
    head = pb.encode_field_varint(1, 3)
    ent = pb.encode_field_varint(1, 0x400000) + pb.encode_field_varint(2, 0) + \
        pb.encode_field_varint(4, 4) + pb.encode_field_varint(5, 2)
    put("images", b"\x00" + im.encode_image(im.PAGEMAP_MAGIC, [head, ent]))
    put("images", b"\x02" + ent)
    put("images", b"\x03" + frame_seed(True))
    put("images", b"\x03" + frame_seed(False))
    page = bytes(PAGE_SIZE)
    new = bytearray(page)
    new[10:20] = b"0123456789"
    put("images", b"\x04\x00" + bytes(_core.xor_encode(page, bytes(new))))
    put("images", b"\x05" + im.encode_pagemap(pm)[12 + 4:])
    if dump:
        magics = {"pstree.img": 0, "core-": 1, "mm-": 2, "inventory.img": 4}
        for name in sorted(os.listdir(dump)):
            with open(os.path.join(dump, name), "rb") as f:
                data = f.read(1 << 16)
            if im.PAGEMAP_RE.match(name):
                put("images", b"\x00" + data)
            for prefix, sel in magics.items():
                if name.startswith(prefix):
                    put("images", b"\x01" + bytes([sel]) + data)


if __name__ == "__main__":
    wire_seeds()
    image_seeds(sys.argv[1] if len(sys.argv) > 1 else None)
    for kind in ("wire", "images"):
        print(kind, len(os.listdir(os.path.join(ROOT, kind))), "seeds")
