"""The destination store: the pages a receiver holds per session, rounds applied on top
of them, and the restorable CRIU image directory materialized at commit.

Layout under the serve directory (every directory mode 0700)::

    <session>/held/        pagemap-*.img + pages-*.img of the last completed round,
                           i.e. exactly what the destination holds; held.json
    <session>/round.tmp/   the round being received (renamed to held/ when it completes)
    <session>/files.tmp/   the image files of the send being received
    <session>/images/      the restorable image directory of the last commit: held/'s
                           memory images (hard links) + the files
    <session>/meta.json    round number, source, committed path

A round never modifies held/ in place: the new pages file of each memory image is
built in round.tmp/ from the held pages (an in-kernel copy of every run both rounds
share) and the received records (applied by the compiled core), verified against the
sender's digest, and swapped in whole. Disk use per session is therefore bounded by
two copies of the memory images plus one of the files, and a failed round leaves
held/ exactly as it was. Every temporary directory is removed on every exit path. A
migration's copy, once it runs, takes the memory images (release_memory: held/ and
images/'s pages files go; serve --keep-pages keeps them).
"""
from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import shutil
from array import array
from dataclasses import dataclass, field

from deltaxfer import PAGE_SIZE, _core
from deltaxfer.core import procmem
from deltaxfer.criu import images as im
from deltaxfer.lazyserve import page_hashes_name
from deltaxfer.wire import ProtocolError, names
from deltaxfer.criu.images import image_id_of  # noqa: F401 (one rule, with the image names)

log = logging.getLogger("deltaxfer.store")

# names that become paths are checked by the wire's rules (wire/names.py), one place
SESSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")   # listing only: see is_session_name
MAX_IMAGES = 4096
MAX_FILE_SIZE = 1 << 30
MAX_FILES = 10_000
# pagemap entries of one image: at most one per present page, and at most this many
# (16 bytes each while received: 64 MiB)
MAX_ENTRIES = 1 << 22


class StoreError(Exception):
    """A round or send cannot be accepted; ``code`` is the protocol's error code."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def image_digest(hashes) -> int:
    """Digest of one memory image: XXH3-64 (seeded with the page count) of its pages'
    XXH3-64 hashes in pagemap order. Sender and receiver compute it independently."""
    n = len(memoryview(hashes).cast("B")) // 8
    return _core.xxh3_64(hashes, seed=n)


def hashes_name(image_id: str) -> str:
    """The file of an image's page hashes (u64 per page, layout order) in held/ and in a
    round's directory."""
    return f"hashes-{image_id}.bin"


def pagemap_name(image_id: str) -> str:
    try:
        names.check_image_id(image_id)
    except ProtocolError as e:
        raise StoreError(e.code, e.reason) from None
    kind, n = image_id.split("-", 1)
    return f"pagemap-{n}.img" if kind == "pid" else f"pagemap-shmem-{n}.img"


def is_session_name(name: str) -> bool:
    try:
        names.check_session_name(name)
        return True
    except ProtocolError:
        return False


# names the receiver itself creates in an image directory: a sender may not plant them
# (a planted restored.pid would name the pid the receiver signals; planted page hashes,
# dx-hashes-ID.bin, would tell the lazy-pages server which pages are zeros)
RESERVED_NAMES = frozenset({"parent", "restored.pid", "lazy-pages.socket", "postcopy.socket"})
RESERVED_PREFIXES = ("dx-", "postcopy-pending-")


def check_file_name(name: str) -> None:
    try:
        names.check_image_name(name)
    except ProtocolError as e:
        raise StoreError(e.code, f"refused image file name {name!r}: {e.reason}") from None
    if im.is_memory_image(name):
        raise StoreError("name", f"refused image file name {name!r}: a memory image")
    if name in RESERVED_NAMES or name.endswith(".log") or name.startswith(RESERVED_PREFIXES):
        raise StoreError("name", f"refused image file name {name!r}: the receiver writes "
                                 "that file itself")


def _mkdir_private(path: str, *, dir_fd: int | None = None) -> None:
    """A directory of this uid, mode 0700: created, or an existing one checked first (a
    real directory, not a link, ours) and only then chmodded, through its fd."""
    try:
        os.mkdir(path, 0o700, dir_fd=dir_fd)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError as e:
        raise StoreError("internal", f"{path}: not a directory this receiver can trust "
                                     f"({e.strerror}: a link or another file?)") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise StoreError("internal", f"{path} belongs to uid {st.st_uid}, not to this "
                                         f"receiver's uid {os.geteuid()}: left as it is")
        if st.st_mode & 0o7777 != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def _trusted_ancestor(st: os.stat_result) -> bool:
    """An ancestor of the serve directory: owned by root or this uid, and not writable by
    group or others -- unless sticky (like /tmp: others cannot rename or remove what is
    not theirs in it)."""
    import stat as _stat
    if st.st_uid not in (0, os.geteuid()) or not _stat.S_ISDIR(st.st_mode):
        return False
    return not (st.st_mode & 0o022) or bool(st.st_mode & _stat.S_ISVTX)


def open_serve_dir(path: str) -> tuple[str, int]:
    """The serve directory, opened and checked: (its resolved path, an O_DIRECTORY fd).

    Links in the ancestors are resolved first (a root-owned /var/run -> /run is fine);
    then every ancestor is opened from / down, each relative to the one above with
    O_NOFOLLOW, and must be a trusted ancestor (_trusted_ancestor); the directory itself
    is created if missing, must not be a link, must belong to this uid, and only then is
    made mode 0700 (fchmod on its fd). Anything else is refused and left untouched."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    if not name:
        raise StoreError("internal", "--dir / : use a directory of its own")
    parent = os.path.realpath(parent)
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        at = "/"
        for comp in [c for c in parent.split("/") if c]:
            if not _trusted_ancestor(os.fstat(fd)):
                break
            nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd, at = nfd, os.path.join(at, comp)
        st = os.fstat(fd)
        if not _trusted_ancestor(st):
            raise StoreError("internal", f"{at} (an ancestor of {path}) is owned by uid "
                                         f"{st.st_uid} or writable by group/others without "
                                         f"the sticky bit (mode {st.st_mode & 0o7777:o}): "
                                         "whoever can write there could swap the serve "
                                         "directory; use a --dir whose every ancestor is "
                                         "root's (or this user's) and not writable by others")
        _mkdir_private(name, dir_fd=fd)
        root_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
    except FileNotFoundError as e:
        raise StoreError("internal", f"{path}: {e.strerror}: create its parent first") from None
    finally:
        os.close(fd)
    return os.path.join(parent, name), root_fd


def _rmtree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def files_bytes(paths) -> int:
    """Bytes allocated on disk by these files (hard links counted once; gone ones 0)."""
    seen, total = set(), 0
    for path in paths:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def disk_bytes(path: str) -> int:
    """Bytes allocated on disk under path (hard links counted once)."""
    return files_bytes(os.path.join(dirpath, n)
                       for dirpath, _dirnames, filenames in os.walk(path) for n in filenames)


_FALLOC_FL_COLLAPSE_RANGE = 0x08
_FALLOC_FL_INSERT_RANGE = 0x20
_libc = ctypes.CDLL(None, use_errno=True)
MAX_RESHAPE_RUNS = 4096


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def can_reshape(directory: str) -> bool:
    """Whether files here can have page-sized ranges inserted and removed in place
    (fallocate INSERT_RANGE / COLLAPSE_RANGE: ext4 and xfs can, tmpfs cannot)."""
    path = os.path.join(directory, ".reshape-probe")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError:
        return False
    try:
        os.ftruncate(fd, 2 * PAGE_SIZE)
        _fallocate(fd, _FALLOC_FL_INSERT_RANGE, 0, PAGE_SIZE)
        _fallocate(fd, _FALLOC_FL_COLLAPSE_RANGE, 0, PAGE_SIZE)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(path)


def reshape_pages_file(fd: int, ops, pages: int) -> None:
    """Turn a pages file laid out for one vaddr set into the layout of another, in place,
    from the edits of ``_core.layout_diff``: removed runs collapsed, inserted runs opened
    as holes (to be written by the round). Applied from the end so that the offsets of
    the edits still to come do not move. Costs a few extent operations, no data copy."""
    size = pages
    for k in range(len(ops) - 3, -1, -3):
        at, n, kind = ops[k], ops[k + 1], ops[k + 2]
        if kind == 0:                                   # remove old pages [at, at + n)
            if at + n >= size:
                os.ftruncate(fd, at * PAGE_SIZE)
            else:
                _fallocate(fd, _FALLOC_FL_COLLAPSE_RANGE, at * PAGE_SIZE, n * PAGE_SIZE)
            size -= n
        else:                                           # insert n pages before old page at
            if at >= size:
                os.ftruncate(fd, (size + n) * PAGE_SIZE)
            else:
                _fallocate(fd, _FALLOC_FL_INSERT_RANGE, at * PAGE_SIZE, n * PAGE_SIZE)
            size += n


def _file_identity(path: str) -> tuple:
    """(dev, inode, size, mtime_ns): a file unchanged since it was last seen keeps it."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def shared_runs(old: im.Pagemap, new: im.Pagemap):
    """(old_page_index, new_page_index, nr_pages) for every run of pages present in both
    pagemaps (a merge of the two entry lists; per entry, not per page)."""
    def present(pm):
        idx = 0
        for e in pm.entries:
            if e.present:
                yield e.vaddr, e.end, idx
                idx += e.nr_pages
    a, b = present(old), present(new)
    ea, eb = next(a, None), next(b, None)
    while ea and eb:
        lo, hi = max(ea[0], eb[0]), min(ea[1], eb[1])
        if lo < hi:
            yield (ea[2] + (lo - ea[0]) // PAGE_SIZE, eb[2] + (lo - eb[0]) // PAGE_SIZE,
                   (hi - lo) // PAGE_SIZE)
        if ea[1] <= eb[1]:
            ea = next(a, None)
        else:
            eb = next(b, None)


@dataclass
class HeldImage:
    image_id: str
    pagemap: im.Pagemap
    pages_path: str
    vaddrs: array | None = None    # the present pages' vaddrs, when a round just made them

    def open(self) -> im.MemoryImage:
        return im.MemoryImage(os.path.join(os.path.dirname(self.pages_path),
                                           pagemap_name(self.image_id)), self.pagemap)


@dataclass
class _IncomingImage:
    index: int
    image_id: str
    entries_expected: int
    pages_expected: int
    pairs: array = field(default_factory=lambda: array("Q"))  # (vaddr, nr | flags << 32)
    fd: int = -1
    applier: object = None          # _core.PageApplier writing the new pages file
    mode: int = -1                  # its mode (_core.APPLY_AT_INDEX / APPLY_APPEND)
    vaddrs: array | None = None
    pages_path: str = ""
    pagemap: im.Pagemap | None = None
    done: bool = False
    parent: object = None           # ParentRound: the held image the child links to
    reshape: object = None          # InPlaceRound: layout edits of the held pages file


class Session:
    def __init__(self, store: "Store", name: str):
        try:
            names.check_session_name(name)
        except ProtocolError as e:
            raise StoreError(e.code, e.reason) from None
        self.store, self.name = store, name
        self.path = os.path.join(store.root, name)
        self.held_dir = os.path.join(self.path, "held")
        self._prepared: str | None = None       # prepare_images_dir's, until a commit
        _mkdir_private(name, dir_fd=store.root_fd)
        self.meta = self._load_meta()
        self._held: dict[str, HeldImage] | None = None
        # held_hashes' files as last read or written: {image_id: ((dev, ino, size,
        # mtime_ns), hashes)}
        self._hashes: dict[str, tuple[tuple, array]] = {}
        if os.path.exists(os.path.join(self.held_dir, ".dirty")):
            # a round was being written in place when the receiver died: what is held
            # cannot be trusted, so the session starts over (the next send is a full one)
            _rmtree(self.held_dir)
            self.meta.update(round=0, source="")
            self._save_meta()

    def _load_meta(self) -> dict:
        try:
            with open(os.path.join(self.path, "meta.json")) as f:
                meta = json.load(f)
            if isinstance(meta, dict) and isinstance(meta.get("round"), int):
                return meta
        except (OSError, ValueError):
            pass
        return {"round": 0, "source": "", "committed": None}

    def _save_meta(self) -> None:
        tmp = os.path.join(self.path, "meta.json.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(self.meta, f)
            os.replace(tmp, os.path.join(self.path, "meta.json"))
        except BaseException:
            try:                 # a full disk: no half-written file is left behind
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    @property
    def round(self) -> int:
        return self.meta["round"]

    # A restore in progress, recorded so that a receiver killed before the source's RESUME
    # can, when it starts again, kill the stopped copy it left (receiver.recover_restores).
    def mark_restoring(self) -> None:
        self.meta["restoring"] = {"since": procmem.boot_ticks_now()}
        self._save_meta()

    def restored(self, pid: int | None) -> None:
        if pid is None:
            if self.meta.pop("restoring", None) is not None:
                self._save_meta()
            return
        self.meta["restoring"] = {"pid": pid, "start": procmem.start_time(pid)}
        self._save_meta()

    def recover(self) -> list[str]:
        """After a receiver died: remove every unfinished state of this session; returns
        what was done. A restore it was inside is the receiver's to finish
        (``interrupted_restore``, receiver.recover_restores): the store holds files."""
        done = []
        for name in os.listdir(self.path):
            if name.endswith(".tmp") or name in ("images.old", "held.released"):
                _rmtree(os.path.join(self.path, name))
                try:
                    os.unlink(os.path.join(self.path, name))
                except OSError:
                    pass
                done.append(f"removed {name}")
        return done

    def interrupted_restore(self) -> dict | None:
        """The restore a receiver that died was inside, as recorded: {"pid", "start"} of
        the restored copy (pid None when criu restore never wrote its pid file, or wrote
        a pid older than the restore), the images directory; None if there was none."""
        rec = self.meta.get("restoring")
        if not isinstance(rec, dict):
            return None
        pid, start = rec.get("pid"), rec.get("start")
        images = os.path.join(self.path, "images")
        if pid is None:       # killed inside criu restore: its pidfile, if it got there
            try:
                with open(os.path.join(images, "restored.pid")) as f:
                    pid = int(f.read().strip())
                start = procmem.start_time(pid)
                if start is None or start < int(rec.get("since", 0)):
                    pid = None
            except (OSError, ValueError):
                pid = None
        if not (isinstance(pid, int) and pid > 1 and isinstance(start, int)):
            pid = start = None
        return {"pid": pid, "start": start, "images": images}

    def held(self) -> dict[str, HeldImage]:
        """The memory images held (from the last completed round), by image id."""
        if self._held is None:
            self._held = self._read_held()
        return self._held

    def _read_held(self) -> dict[str, HeldImage]:
        out = {}
        if not os.path.isdir(self.held_dir):
            return out
        for name in sorted(os.listdir(self.held_dir)):
            image_id = image_id_of(name)
            if image_id:
                pm = im.read_pagemap(os.path.join(self.held_dir, name))
                out[image_id] = HeldImage(image_id, pm, os.path.join(
                    self.held_dir, f"pages-{pm.pages_id}.img"))
        return out

    def held_hashes(self, image_id: str) -> tuple[array, array]:
        """(vaddrs, hashes) of a held image's pages: the hashes computed from the stored
        pages when their round was verified (hashes-ID.bin), else hashed from disk. The
        file's content is kept in memory while its identity (inode, size, mtime) stays
        the same: an 8 MiB read per round at 4 GiB otherwise. Read-only to callers."""
        held = self.held()[image_id]
        vaddrs = held.vaddrs if held.vaddrs is not None else held.pagemap.present_vaddrs()
        cached = os.path.join(self.held_dir, hashes_name(image_id))
        try:
            key = _file_identity(cached)
            mem = self._hashes.get(image_id)
            if mem is not None and mem[0] == key and len(mem[1]) == len(vaddrs):
                return vaddrs, mem[1]            # the file as this receiver wrote it
            with open(cached, "rb") as f:
                hashes = array("Q")
                hashes.frombytes(f.read())
            if len(hashes) == len(vaddrs):
                self._hashes[image_id] = (key, hashes)
                return vaddrs, hashes
        except OSError:
            pass
        with held.open() as mem:
            hashes, _, _ = _core.hash_pages(mem.pages)
            return vaddrs, hashes

    def write_hashes(self, image_id: str, hashes: array, changed=None) -> None:
        """hashes-ID.bin in held/ as ``hashes``. ``changed`` (array('Q') of (index,
        count) pairs): the layout is the file's and only those entries differ -- they are
        written in place (a few KiB instead of 8 MiB at 4 GiB; a crash in between leaves
        held/.dirty anyway, see InPlaceRound). Remembered for held_hashes."""
        path = os.path.join(self.held_dir, hashes_name(image_id))
        done = False
        if changed is not None:
            try:
                fd = os.open(path, os.O_WRONLY)
            except FileNotFoundError:
                fd = -1
            if fd >= 0:
                try:
                    if os.fstat(fd).st_size == len(hashes) * 8:
                        _core.write_u64_runs(fd, hashes, changed)
                        done = True
                finally:
                    os.close(fd)
        if not done:
            with open(path, "wb") as f:
                f.write(hashes)
        self._hashes[image_id] = (_file_identity(path), hashes)

    @property
    def final_dir(self) -> str:
        return os.path.join(self.path, "final")

    def begin_round(self, round_no: int, source: str = "", *, parent_linked: bool = False
                    ) -> "Round":
        """A round. ``parent_linked`` (a migration's final round): the received pages go
        to a child image whose other pages are PE_PARENT entries over the held pages, so
        the round writes only what changed — nothing is copied inside the freeze."""
        if self.meta.get("final"):
            raise StoreError("unexpected", f"session {self.name!r} already had its final round")
        if round_no != self.round + 1:
            raise StoreError("unexpected", f"round {round_no} does not follow round {self.round} "
                                           f"of session {self.name!r}")
        if parent_linked and self.held():
            return ParentRound(self, round_no, source)
        if self.held():
            return InPlaceRound(self, round_no, source)
        return Round(self, round_no, source)

    def begin_files(self) -> "FileSet":
        return FileSet(self)

    def prepare_images_dir(self) -> str:
        """The directory the next commit fills and renames to <session>/images, made now
        (empty, private), so that a restore's lazy-pages daemon can be started in it
        before the commit (its work happens in the directory it opened)."""
        tmp = os.path.join(self.path, "images.tmp")
        _rmtree(tmp)
        _mkdir_private(tmp)
        self._prepared = tmp
        # a receiver that dies before the commit left a daemon there (recover_restores)
        self.meta["preparing"] = True
        self._save_meta()
        return tmp

    def release_memory(self) -> int:
        """A migration's copy runs (RESUMED: the source is gone): the session's memory is
        the restored process's now, so its copies here go -- held/ (no later session
        diffs against it: its next round is a whole one) and the pages files and page
        hashes of images/ (a `criu restore` of those images fails on the missing pages
        rather than bringing back a stale copy). The lazy-pages server keeps the files
        it still serves open: they are freed when it is done (and, recycling, block by
        block before). The pagemaps, the other images and criu's logs stay. Returns the
        bytes the removed names held (shared inodes counted once)."""
        final = self.meta.get("committed")
        doomed = []
        if final and os.path.isdir(final):
            doomed += [os.path.join(final, n) for n in os.listdir(final)
                       if im.PAGES_RE.match(n) or n.startswith("dx-hashes-")]
        if os.path.isdir(self.held_dir):
            doomed += [os.path.join(self.held_dir, n) for n in os.listdir(self.held_dir)]
        freed = files_bytes(doomed)
        # held/ out of the way in one step (a removal that fails half-way leaves a
        # directory no later session reads), then removed
        gone = os.path.join(self.path, "held.released")
        _rmtree(gone)
        if os.path.isdir(self.held_dir):
            os.rename(self.held_dir, gone)
        _rmtree(gone)
        for path in doomed:
            if not path.startswith(self.held_dir + os.sep):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        self._held = None
        self._hashes.clear()
        return freed

    def discard_prepared(self) -> None:
        """The directory prepare_images_dir made, when no commit took it."""
        tmp, self._prepared = self._prepared, None
        if tmp is not None:
            _rmtree(tmp)
        if self.meta.pop("preparing", None) is not None:
            try:
                self._save_meta()
            except OSError:
                # (a full disk) the mark stays on disk: a receiver started later finds no
                # daemon and no directory for it, and drops it
                pass

    def commit(self, files: "FileSet") -> str:
        """Materialize <session>/images: the held memory images plus the files."""
        if not os.path.isdir(self.held_dir):
            raise StoreError("unexpected", "commit before any round completed")
        if not os.path.exists(os.path.join(files.path, "pstree.img")):
            raise StoreError("missing-page", "commit without pstree.img: not a CRIU dump")
        tmp = os.path.join(self.path, "images.tmp")
        if self._prepared != tmp or not os.path.isdir(tmp):
            _rmtree(tmp)
            _mkdir_private(tmp)
        self._prepared = None
        self.meta.pop("preparing", None)      # saved with "committed" below
        try:
            if os.path.isdir(self.final_dir):   # a child over the held pages
                for name in os.listdir(self.final_dir):
                    if im.is_memory_image(name):
                        os.link(os.path.join(self.final_dir, name), os.path.join(tmp, name))
                os.symlink(os.path.join("..", "held"), os.path.join(tmp, "parent"))
            else:
                for name in os.listdir(self.held_dir):
                    if im.is_memory_image(name):
                        os.link(os.path.join(self.held_dir, name), os.path.join(tmp, name))
                # each pages file's page hashes, for the lazy-pages server: a page hashing
                # as zeros gets the zero page without its file page being read
                for image_id, held in self.held().items():
                    hashes = os.path.join(self.held_dir, hashes_name(image_id))
                    if os.path.exists(hashes):
                        os.link(hashes, os.path.join(
                            tmp, page_hashes_name(held.pagemap.pages_id)))
            for name in os.listdir(files.path):
                os.rename(os.path.join(files.path, name), os.path.join(tmp, name))
            final = os.path.join(self.path, "images")
            old = os.path.join(self.path, "images.old")
            _rmtree(old)
            if os.path.exists(final):
                os.rename(final, old)
            os.rename(tmp, final)
            _rmtree(old)
        finally:
            _rmtree(tmp)
            files.discard()
        self.meta["committed"] = final
        self._save_meta()
        return final


class Round:
    """One round being received; becomes the held state only at :meth:`finish`."""

    dir_name = "round.tmp"

    def __init__(self, session: Session, round_no: int, source: str):
        self.session, self.round_no, self.source = session, round_no, source
        self.dir = os.path.join(session.path, self.dir_name)
        _rmtree(self.dir)
        _mkdir_private(self.dir)
        self.held = session.held()
        self.images: dict[int, _IncomingImage] = {}
        self.next_pages_id = 1 + max((h.pagemap.pages_id for h in self.held.values()), default=0)
        self.closed = False

    # -- per memory image ------------------------------------------------------------
    def begin_image(self, index: int, image_id: str, entries: int, pages: int) -> None:
        pagemap_name(image_id)
        if index != len(self.images) or index >= MAX_IMAGES:
            raise StoreError("unexpected", f"image index {index} out of order")
        if any(x.image_id == image_id for x in self.images.values()):
            raise StoreError("unexpected", f"image {image_id} sent twice in one round")
        if any(not x.done for x in self.images.values()):
            raise StoreError("unexpected", "an image began before the previous one ended")
        if not (0 <= entries <= im.MAX_NR_PAGES and 0 <= pages <= im.MAX_NR_PAGES):
            raise StoreError("too-large", f"absurd image size: {entries} entries, {pages} pages")
        if entries > pages or entries > MAX_ENTRIES:
            # every entry holds at least one present page (what CRIU dumps): the entries
            # kept while the pagemap arrives are bounded by the pages reserved below
            raise StoreError("too-large", f"{image_id}: {entries} pagemap entries for {pages} "
                                          f"pages (at most one entry per page, {MAX_ENTRIES} "
                                          "in all)")
        self.session.store.reserve(self, pages * PAGE_SIZE)
        self.images[index] = _IncomingImage(index, image_id, entries, pages)

    def _image(self, index: int) -> _IncomingImage:
        img = self.images.get(index)
        if img is None or img.done:
            raise StoreError("unexpected", f"no open memory image with index {index}")
        return img

    def _settled(self) -> None:
        """Wait until no job of an apply pool (_core.ApplyPool) works on one of this
        round's appliers: their files are closed after this."""
        for img in self.images.values():
            if img.applier is not None and img.mode == _core.APPLY_AT_INDEX:
                img.applier.wait_idle()

    def _ending(self, index: int) -> _IncomingImage:
        self._settled()
        return self._image(index)

    def unordered_applier(self, index: int):
        """The image's applier if its frames may be applied out of order, on other
        threads (applies_unordered), else None."""
        return self.images[index].applier if self.applies_unordered(index) else None

    def apply_error(self, index: int, e: BaseException) -> StoreError:
        """What a failed apply of image `index` (PageApplier.apply, ApplyPool) means."""
        img = self.images.get(index)
        name = img.image_id if img is not None else f"image {index}"
        if isinstance(e, StoreError):
            return e
        if isinstance(e, OSError) and img is not None:
            return _disk_error(img, e)
        if isinstance(e, ValueError):   # FrameError is a ValueError
            return StoreError("bad-payload", f"{name}: {e}")
        return StoreError("internal", f"{name}: {e}")

    def applies_unordered(self, index: int) -> bool:
        """Whether frames of image `index` may go to an apply pool's threads (in any
        order): its pages file is open in at-index mode (a whole image, opened by its
        first frame), where each page is taken once whatever the frames' order. Append
        mode (a final round, a round in place) is written in arrival order, by add_pages."""
        img = self.images.get(index)
        return (img is not None and not img.done and img.applier is not None
                and img.mode == _core.APPLY_AT_INDEX)

    def add_pagemap(self, index: int, entries) -> None:
        """entries: a PAGEMAP message's flat u64 pairs (vaddr, nr_pages | flags << 32) as
        a buffer (memoryview / array('Q')), or an iterable of (vaddr, nr_pages, flags)."""
        img = self._image(index)
        if img.vaddrs is not None:
            raise StoreError("unexpected", "pagemap entries after the first page frame")
        if isinstance(entries, (memoryview, array, bytes, bytearray)):
            raw = memoryview(entries).cast("B")
            if len(raw) % 16:
                raise StoreError("bad-payload", f"{img.image_id}: a partial pagemap entry")
            n = len(raw) // 16
        else:
            pairs = array("Q")
            for vaddr, nr, flags in entries:
                if not (0 <= nr < 1 << 32 and 0 <= flags < 1 << 32):
                    raise StoreError("bad-payload", f"{img.image_id}: bad pagemap entry")
                pairs.append(vaddr)
                pairs.append(nr | flags << 32)
            raw, n = memoryview(pairs).cast("B"), len(pairs) // 2
        if len(img.pairs) // 2 + n > img.entries_expected:
            raise StoreError("bad-payload", f"{img.image_id}: more pagemap entries than the "
                                            f"{img.entries_expected} announced")
        img.pairs.frombytes(raw)

    def _complete_pagemap(self, img: _IncomingImage) -> im.Pagemap:
        """The image's pagemap, all of it received: checked by the core (aligned,
        ascending, sizes), its present vaddrs in img.vaddrs, with the next free pages_id.
        Built into an im.Pagemap once per image, for the pagemap file."""
        n = len(img.pairs) // 2
        if n != img.entries_expected:
            raise StoreError("bad-payload", f"{img.image_id}: {n} pagemap entries, "
                                            f"{img.entries_expected} announced")
        try:
            vaddrs = _core.pagemap_layout(img.pairs)
        except ValueError as e:
            raise StoreError("bad-payload", f"{img.image_id}: {e}") from None
        if len(vaddrs) != img.pages_expected:
            raise StoreError("bad-payload", f"{img.image_id}: pagemap holds {len(vaddrs)} "
                                            f"pages, {img.pages_expected} announced")
        pm = im.ArrayPagemap(self.next_pages_id, img.pairs, len(vaddrs))
        img.pairs = array("Q")
        self.next_pages_id += 1
        img.vaddrs = vaddrs
        return pm

    @staticmethod
    def _check_digest(img: _IncomingImage, hashes, digest: int) -> None:
        mine = image_digest(hashes)
        if mine != digest:
            raise StoreError("digest", f"{img.image_id}: the destination's pages do not match "
                                       f"the source's (digest {mine:016x} != {digest:016x})")

    def _applier(self, img: _IncomingImage, mode: int, held: HeldImage | None):
        """The core's applier for img.fd; XOR bases from the held pages (mapped read-only)."""
        held_v = held_h = None
        hfd = -1
        if held is not None:
            held_v, held_h = self.session.held_hashes(img.image_id)
            hfd = os.open(held.pages_path, os.O_RDONLY)
        try:
            try:
                img.applier = _core.PageApplier(img.vaddrs, img.fd, mode, held_v, hfd)
                img.mode = mode
            except ValueError as e:
                raise StoreError("internal", f"{img.image_id}: the held image: {e}") from None
            if mode == _core.APPLY_AT_INDEX and held is not None:
                img.applier.share_held(hfd, held_h)
        except OSError as e:
            raise _disk_error(img, e) from None
        finally:
            if hfd >= 0:
                os.close(hfd)
        img.held_vaddrs, img.held_hashes = held_v, held_h

    def _open_pages(self, img: _IncomingImage) -> None:
        """Pagemap complete: validate it, size the new pages file and copy in every page
        the destination already holds (in-kernel); received pages are written at their
        place by the core (pwritev), never through a mapping of the new file."""
        if img.pagemap is None:           # (InPlaceRound may have completed it already)
            img.pagemap = self._complete_pagemap(img)
        pm = img.pagemap
        img.pages_path = os.path.join(self.dir, f"pages-{pm.pages_id}.img")
        size = len(img.vaddrs) * PAGE_SIZE
        img.fd = os.open(img.pages_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Allocating the blocks up front makes a full disk fail here, cleanly; the
            # core then leaves zero pages unwritten (the allocated range reads as zeros).
            if size:
                os.posix_fallocate(img.fd, 0, size)
        except OSError as e:
            raise StoreError("quota", f"cannot allocate {size} bytes for {img.pages_path}: "
                                      f"{e.strerror}") from None
        self._applier(img, _core.APPLY_AT_INDEX, self.held.get(img.image_id))

    def add_pages(self, index: int, frames) -> dict:
        """Apply page frames (the core's format) to the image's new pages file."""
        img = self._image(index)
        if img.vaddrs is None:
            self._open_pages(img)
        try:
            zero, xor, full = img.applier.apply(frames)
        except (ValueError, OSError) as e:  # FrameError is a ValueError
            raise self.apply_error(index, e) from None
        return {"zero": zero, "xor": xor, "full": full}

    def _close_image(self, img: _IncomingImage) -> None:
        if img.applier is not None:
            img.applier.close()
        if img.fd >= 0:
            os.close(img.fd)
            img.fd = -1

    def end_image(self, index: int, digest: int) -> None:
        img = self._ending(index)
        if img.vaddrs is None:
            self._open_pages(img)
        try:
            hashes, missing = img.applier.finish()
        except OSError as e:
            raise _disk_error(img, e) from None
        finally:
            self._close_image(img)
        if missing:
            raise StoreError("missing-page", f"{img.image_id}: {missing} pages are new to the "
                                             "destination but were not sent")
        self._check_digest(img, hashes, digest)
        im.write_pagemap(os.path.join(self.dir, pagemap_name(img.image_id)), img.pagemap)
        with open(os.path.join(self.dir, hashes_name(img.image_id)), "wb") as f:
            f.write(hashes)  # for the next round's STATE and digest, without re-reading
        img.done = True

    # -- the round as a whole --------------------------------------------------------
    def finish(self) -> dict:
        """All images verified: the round becomes the held state."""
        if not self.images or any(not x.done for x in self.images.values()):
            raise StoreError("unexpected", "round ended with an image still open or none sent")
        s = self.session
        old = os.path.join(s.path, "held.old")
        _rmtree(old)
        if os.path.exists(s.held_dir):
            os.rename(s.held_dir, old)
        os.rename(self.dir, s.held_dir)
        # what is held now, as this round made it (not read back from disk next round)
        s._held = {x.image_id: HeldImage(x.image_id, x.pagemap, os.path.join(
            s.held_dir, os.path.basename(x.pages_path)), x.vaddrs) for x in self.images.values()}
        _rmtree(old)
        s.meta.update(round=self.round_no, source=self.source)
        s._save_meta()
        self.closed = True
        self.session.store.release(self)
        return {"round": self.round_no,
                "pages": sum(x.pagemap.present_pages for x in self.images.values())}

    def abort(self) -> None:
        if self.closed:
            return
        self._settled()
        for img in self.images.values():
            self._close_image(img)
        _rmtree(self.dir)
        self.closed = True
        self.session.store.release(self)


def _disk_error(img: _IncomingImage, e: OSError) -> StoreError:
    code = "quota" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "internal"
    return StoreError(code, f"writing {img.pages_path or img.image_id}: "
                            f"{e.strerror or e}")


class ParentRound(Round):
    """A migration's final round, written as a child image over the held pages.

    Only the received pages are written (appended in arrival order, which is ascending
    vaddr order: the order of the child's PRESENT entries); every other page of the new
    pagemap becomes a PE_PARENT entry resolved by CRIU through ``parent -> ../held``.
    The digest is checked from the received pages' hashes and the held pages' cached
    hashes, so nothing of the held image is read or copied inside the freeze."""

    dir_name = "final.tmp"

    def _open_pages(self, img: _IncomingImage) -> None:
        held = self.held.get(img.image_id)
        if held is None:  # an image new in this round: all of it comes in the round
            img.parent = None
            return super()._open_pages(img)
        img.pagemap = self._complete_pagemap(img)
        if held.vaddrs is not None and img.vaddrs == held.vaddrs:
            # the usual case (a live round): one array for both layouts, not two (8 bytes
            # a page: 32 MiB at 16 GiB)
            img.vaddrs = held.vaddrs
        img.parent = held
        img.pages_path = os.path.join(self.dir, f"pages-{img.pagemap.pages_id}.img")
        img.fd = os.open(img.pages_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._applier(img, _core.APPLY_APPEND, held)

    def _verify_received(self, img: _IncomingImage, digest: int):
        """Every page of the new layout is received or held, and together they match the
        source's digest; returns (hashes, runs by source) from the core's merge."""
        try:
            recv_vaddrs, recv_hashes = img.applier.finish()
        except OSError as e:
            raise _disk_error(img, e) from None
        finally:
            self._close_image(img)
        try:
            hashes, runs, missing = _core.merge_parent_hashes(
                img.vaddrs, img.held_vaddrs, img.held_hashes, recv_vaddrs, recv_hashes)
        except ValueError as e:
            raise StoreError("bad-payload", f"{img.image_id}: {e}") from None
        if missing:
            raise StoreError("missing-page", f"{img.image_id}: {missing} pages are new to the "
                                             "destination but were not sent")
        self._check_digest(img, hashes, digest)
        return hashes, runs

    def end_image(self, index: int, digest: int) -> None:
        img = self._ending(index)
        if img.vaddrs is None:
            self._open_pages(img)
        if img.parent is None:
            return super().end_image(index, digest)
        hashes, runs = self._verify_received(img, digest)
        # child pagemap: the runs, split where the round's own entries change flags
        entries, ei, pm_entries = [], 0, [e for e in img.pagemap.entries if e.present]
        for r in range(0, len(runs), 3):
            v, n, from_parent = runs[r], runs[r + 1], runs[r + 2]
            end = v + n * PAGE_SIZE
            while v < end:
                while pm_entries[ei].end <= v:
                    ei += 1
                e = pm_entries[ei]
                stop = min(end, e.end)
                lazy = e.flags & im.PE_LAZY
                flags = (im.PE_PARENT | lazy) if from_parent else (im.PE_PRESENT | lazy)
                entries.append(im.PagemapEntry(v, (stop - v) // PAGE_SIZE, flags))
                v = stop
        child = im.Pagemap(img.pagemap.pages_id, entries).coalesced()
        im.write_pagemap(os.path.join(self.dir, pagemap_name(img.image_id)), child)
        img.done = True

    def finish(self) -> dict:
        if not self.images or any(not x.done for x in self.images.values()):
            raise StoreError("unexpected", "round ended with an image still open or none sent")
        s = self.session
        _rmtree(s.final_dir)
        os.rename(self.dir, s.final_dir)
        s.meta.update(round=self.round_no, source=self.source, final=True)
        s._save_meta()
        self.closed = True
        s.store.release(self)
        return {"round": self.round_no,
                "pages": sum(x.pagemap.present_pages for x in self.images.values())}


class InPlaceRound(ParentRound):
    """A round over held pages whose layout (the present vaddrs) did not change: the
    received pages are collected beside held/, verified (digest from their hashes and the
    held pages' cached hashes), and only then written over the held pages in place — a
    round costs what it received, not the image size. An image whose layout changed is
    rebuilt whole, as by :class:`Round`. A crash while writing leaves held/.dirty, and
    the session then starts over from nothing (see Session)."""

    dir_name = "round.tmp"

    def _open_pages(self, img: _IncomingImage) -> None:
        held = self.held.get(img.image_id)
        if held is not None:
            super()._open_pages(img)          # validates, sets vaddrs and the side file
            img.reshape = None
            if img.vaddrs is img.held_vaddrs or img.vaddrs == img.held_vaddrs:
                return                        # (the same array: ParentRound found them equal)
            ops = _core.layout_diff(img.held_vaddrs, img.vaddrs)
            if self.session.store.reshapable and len(ops) // 3 <= MAX_RESHAPE_RUNS:
                img.reshape = ops             # pages added or removed: edit the file's layout
                return
            # the layout changed and cannot be edited in place: rebuild this image whole
            log.info("%s: %d pages now, %d held, %d runs differ: rebuilding the image "
                     "instead of updating it in place", img.image_id, len(img.vaddrs),
                     len(img.held_vaddrs), len(ops) // 3)
            self._close_image(img)
            os.unlink(img.pages_path)
            img.applier = None
        img.parent = None
        Round._open_pages(self, img)

    def end_image(self, index: int, digest: int) -> None:
        img = self._ending(index)
        if img.vaddrs is None:
            self._open_pages(img)
        if img.parent is None:
            return Round.end_image(self, index, digest)
        hashes, runs = self._verify_received(img, digest)
        img.hashes, img.runs = hashes, runs
        img.done = True

    def finish(self) -> dict:
        if not self.images or any(not x.done for x in self.images.values()):
            raise StoreError("unexpected", "round ended with an image still open or none sent")
        s = self.session
        dirty = os.path.join(s.held_dir, ".dirty")
        open(dirty, "w").close()
        sent = {x.image_id for x in self.images.values()}
        for image_id, h in self.held.items():          # images gone from the tree
            if image_id not in sent:
                self._drop_held(image_id, h)
        now: dict[str, HeldImage] = {}                 # the held state this round leaves
        for img in self.images.values():
            name = pagemap_name(img.image_id)
            if img.parent is not None:                 # in place
                held = img.parent
                src = os.open(img.pages_path, os.O_RDONLY)
                dst = os.open(held.pages_path, os.O_WRONLY)
                try:
                    if img.reshape is not None:
                        reshape_pages_file(dst, img.reshape, len(img.held_vaddrs))
                    # (index, n) pairs of the received runs, copied in C: a syscall per run
                    # and no Python (hundreds of single-page runs in a final round)
                    try:
                        received = _core.copy_received_runs(src, dst, img.runs)
                    except EOFError:
                        raise StoreError("internal", f"{img.image_id}: the round's received "
                                                     "pages file ended early") from None
                finally:
                    os.close(src)
                    os.close(dst)
                pm = (img.pagemap.with_pages_id(held.pagemap.pages_id)
                      if isinstance(img.pagemap, im.ArrayPagemap)
                      else im.Pagemap(held.pagemap.pages_id, img.pagemap.entries))
                im.write_pagemap(os.path.join(s.held_dir, name + ".new"), pm)
                now[img.image_id] = HeldImage(img.image_id, pm, held.pages_path, img.vaddrs)
                os.replace(os.path.join(s.held_dir, name + ".new"), os.path.join(s.held_dir, name))
                s.write_hashes(img.image_id, img.hashes,
                               received if img.reshape is None else None)
            else:                                      # rebuilt whole in round.tmp
                old = self.held.get(img.image_id)
                if old is not None:
                    self._drop_held(img.image_id, old)
                for f in (name, os.path.basename(img.pages_path), hashes_name(img.image_id)):
                    os.replace(os.path.join(self.dir, f), os.path.join(s.held_dir, f))
                now[img.image_id] = HeldImage(img.image_id, img.pagemap, os.path.join(
                    s.held_dir, os.path.basename(img.pages_path)), img.vaddrs)
        os.unlink(dirty)
        _rmtree(self.dir)
        s._held = now
        s.meta.update(round=self.round_no, source=self.source)
        s._save_meta()
        self.closed = True
        s.store.release(self)
        return {"round": self.round_no,
                "pages": sum(x.pagemap.present_pages for x in self.images.values())}

    def _drop_held(self, image_id: str, held: HeldImage) -> None:
        for f in (pagemap_name(image_id), os.path.basename(held.pages_path),
                  hashes_name(image_id)):
            try:
                os.unlink(os.path.join(self.session.held_dir, f))
            except FileNotFoundError:
                pass


class FileSet:
    """The non-memory image files of one send, written under files.tmp/."""

    def __init__(self, session: Session):
        self.session = session
        self.path = os.path.join(session.path, "files.tmp")
        _rmtree(self.path)
        _mkdir_private(self.path)
        self.count = 0
        self.bytes = 0
        self._f = None              # the raw fd of the file being written, or None
        self._hash = None           # its XXH3, updated as data is written
        self._name = None
        self._left = 0

    def begin(self, name: str, size: int, mode: int = 0o600) -> None:
        check_file_name(name)
        if self._f is not None:
            raise StoreError("unexpected", f"file {name!r} began before {self._name!r} ended")
        if not 0 <= size <= MAX_FILE_SIZE:
            raise StoreError("too-large", f"file {name!r} of {size} bytes (limit {MAX_FILE_SIZE})")
        if self.count >= MAX_FILES:
            raise StoreError("too-large", f"more than {MAX_FILES} files")
        path = os.path.join(self.path, name)
        if os.path.lexists(path):
            raise StoreError("name", f"file {name!r} sent twice")
        self.session.store.reserve(self, size)
        self._f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.fchmod(self._f, (mode & 0o600) | 0o400)
        self._hash = _core.Xxh3Stream()
        self._name, self._left = name, size

    def data(self, chunk) -> None:
        if self._f is None:
            raise StoreError("unexpected", "file data outside a file")
        n = len(chunk)
        if n > self._left:
            raise StoreError("bad-payload", f"file {self._name!r}: more data than announced")
        view = memoryview(chunk).cast("B")
        try:
            done = 0
            while done < n:                     # a short write is continued, not lost
                k = os.write(self._f, view[done:])
                if k <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += k
        except OSError as e:
            raise StoreError("quota", f"writing {self._name!r}: {e.strerror}") from None
        self._hash.update(view)                 # hashed as written: nothing is read back
        self._left -= n
        self.bytes += n

    def end(self, xxh3: int) -> None:
        if self._f is None:
            raise StoreError("unexpected", "file end outside a file")
        name, fd = self._name, self._f
        self._f = None
        try:
            if self._left:
                raise StoreError("bad-payload", f"file {name!r}: {self._left} bytes short")
            if self._hash.digest() != xxh3:
                raise StoreError("digest", f"file {name!r}: content hash mismatch")
        finally:
            os.close(fd)
        self.count += 1

    def discard(self) -> None:
        if self._f is not None:
            os.close(self._f)
            self._f = None
        _rmtree(self.path)
        self.session.store.release(self)


class Store:
    """The serve directory: sessions, and a disk quota shared by everything in flight."""

    def __init__(self, root: str, quota_bytes: int | None = None, *,
                 session_quota_bytes: int | None = None, max_sessions: int | None = None):
        # whoever could write the directory or an ancestor could swap a session's files
        # for links the receiver follows: see open_serve_dir
        self.root, self.root_fd = open_serve_dir(root)
        self.quota_bytes = quota_bytes
        self.session_quota_bytes = session_quota_bytes
        self.max_sessions = max_sessions
        self._reserved: dict[int, tuple[str, int]] = {}
        self.reshapable = can_reshape(self.root)
        self.recovered = self.recover()

    def recover(self) -> dict[str, list[str]]:
        """Clean what a receiver that died (SIGKILL, power) left in every session's files
        (its processes: receiver.recover_restores)."""
        out = {}
        for session in self.sessions():
            done = session.recover()
            if done:
                log.warning("session %s: recovered after an unclean stop: %s",
                            session.name, "; ".join(done))
                out[session.name] = done
        return out

    def sessions(self) -> list[Session]:
        """Every session directory kept here, by name."""
        out = []
        for name in sorted(os.listdir(self.root)):
            if is_session_name(name) and os.path.isdir(os.path.join(self.root, name)) \
                    and not os.path.islink(os.path.join(self.root, name)):
                out.append(Session(self, name))
        return out

    def session(self, name: str) -> Session:
        """A session, created if new; with ``max_sessions``, a new one only while fewer
        are kept (session quota x max sessions bounds the disk a key holder can fill)."""
        if self.max_sessions is not None and is_session_name(name) \
                and not os.path.isdir(os.path.join(self.root, name)):
            kept = sum(1 for n in os.listdir(self.root) if is_session_name(n))
            if kept >= self.max_sessions:
                raise StoreError("quota", f"{kept} sessions are kept here, the limit: remove "
                                          f"old ones from {self.root} to start session {name!r}")
        return Session(self, name)

    def reserve(self, owner, nbytes: int) -> None:
        """Account bytes about to be written by a round or file set against the quotas:
        all transfers in flight together, and one session (what it keeps on disk plus
        what it has in flight)."""
        used = sum(n for _, n in self._reserved.values())
        if self.quota_bytes is not None and used + nbytes > self.quota_bytes:
            raise StoreError("quota", f"{nbytes} more bytes would exceed the quota of "
                                      f"{self.quota_bytes} bytes ({used} in flight)")
        session = owner.session
        mine = self._reserved.get(id(owner), (session.name, 0))[1]
        if self.session_quota_bytes is not None:
            kept = disk_bytes(session.path)
            flight = sum(n for s, n in self._reserved.values() if s == session.name)
            if kept + flight + nbytes > self.session_quota_bytes:
                raise StoreError("quota", f"session {session.name!r}: {nbytes} more bytes "
                                          f"would exceed its quota of {self.session_quota_bytes} "
                                          f"bytes ({kept} on disk, {flight} reserved)")
        self._reserved[id(owner)] = (session.name, mine + nbytes)

    def release(self, owner) -> None:
        self._reserved.pop(id(owner), None)

    def close(self) -> None:
        fd, self.root_fd = getattr(self, "root_fd", -1), -1
        if fd >= 0:
            os.close(fd)

    __del__ = close
