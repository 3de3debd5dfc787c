"""`deltaxfer inspect` and `deltaxfer diff`: what is in a dump, and what changed between
two dumps of the same process — including the bytes a delta transfer would send.

All per-page work (zero detection, hashing, comparing, encoding) is done by the
compiled core on the mmapped pages files; Python only walks processes and VMAs (and,
for the estimate below, picks the sampled chunks).

The whole-image transfer size (every page of the new dump through lz4) is, by default,
an estimate from a sample: compressing every page took ~7x the time of reading both
pages files. ``exact=True`` (``deltaxfer diff --exact``) compresses them all.
"""
from __future__ import annotations

import math
import os
import random
from collections import defaultdict

from deltaxfer import PAGE_SIZE, _core
from deltaxfer.criu.dumpdir import DumpDir
from deltaxfer.criu.images import ImageError, MemoryImage


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _memory_summary(mem: MemoryImage) -> dict:
    _, zero, _ = _core.hash_pages(mem.pages)
    return {
        "pagemap_entries": len(mem.pagemap.entries),
        "pages_id": mem.pagemap.pages_id,
        "present_pages": mem.nr_pages,
        "zero_pages": zero.count(1),
        "pages_bytes": mem.nr_pages * PAGE_SIZE,
        "lazy_pages": sum(e.nr_pages for e in mem.pagemap.entries if e.flags & 2),
        "parent_pages": sum(e.nr_pages for e in mem.pagemap.entries if e.in_parent),
    }


def inspect_dump(path) -> dict:
    d = DumpDir.open(path)
    files = [f for f in os.scandir(d.path) if f.is_file(follow_symlinks=False)]
    out = {"dir": os.path.abspath(d.path), "files": len(files),
           "bytes": sum(f.stat().st_size for f in files), "processes": [], "shmem": []}
    for p in d.processes:
        vmas = d.vmas(p.pid)
        kinds: dict = defaultdict(lambda: {"count": 0, "bytes": 0})
        for v in vmas:
            kinds[v.kind]["count"] += 1
            kinds[v.kind]["bytes"] += v.size
        with d.memory(p.pid) as mem:
            summary = _memory_summary(mem)
        out["processes"].append({
            "pid": p.pid, "ppid": p.ppid, "comm": d.comm(p.pid), "threads": list(p.threads),
            "vmas": len(vmas), "vma_bytes": sum(v.size for v in vmas),
            "vmas_by_kind": dict(sorted(kinds.items())), **summary})
    for sid in d.shmem_ids():
        with d.shmem(sid) as mem:
            out["shmem"].append({"shmid": sid, **_memory_summary(mem)})
    everything = out["processes"] + out["shmem"]
    out["totals"] = {k: sum(x[k] for x in everything)
                     for k in ("present_pages", "zero_pages", "pages_bytes")}
    return out


def render_inspect(info: dict) -> str:
    lines = [f"{info['dir']}: {info['files']} files, {_mib(info['bytes'])}"]
    for p in info["processes"]:
        lines.append(f"  pid {p['pid']} ({p['comm']}) ppid {p['ppid']}, {len(p['threads'])} "
                     f"thread(s), {p['vmas']} VMAs ({_mib(p['vma_bytes'])} mapped)")
        for kind, v in p["vmas_by_kind"].items():
            lines.append(f"      {kind:<13} {v['count']:>5} VMAs {_mib(v['bytes']):>12}")
        lines.append(f"    pages: {p['present_pages']} present ({_mib(p['pages_bytes'])}), "
                     f"{p['zero_pages']} zero, {p['pagemap_entries']} pagemap entries, "
                     f"pages-{p['pages_id']}.img")
    for s in info["shmem"]:
        lines.append(f"  shmem {s['shmid']}: {s['present_pages']} present pages "
                     f"({_mib(s['pages_bytes'])}), {s['zero_pages']} zero")
    t = info["totals"]
    lines.append(f"  total: {t['present_pages']} pages ({_mib(t['pages_bytes'])}), "
                 f"{t['zero_pages']} zero ({_pct(t['zero_pages'], t['present_pages'])})")
    return "\n".join(lines) + "\n"


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "-"


# The whole-image estimate: SAMPLE_CHUNKS chunks of CHUNK_PAGES pages (one frame of full
# pages, 256 KiB), one drawn at random from each of SAMPLE_CHUNKS equal strata of the
# image, each lz4-encoded as a round of its own. The error stated is ERROR_SIGMAS standard
# errors of the mean per-page size over the chunks (as a simple random sample, with the
# finite-population correction), times the image's pages.
CHUNK_PAGES = 64
SAMPLE_CHUNKS = 256
ERROR_SIGMAS = 3


def _full_image_size(new: MemoryImage, new_v, exact: bool, seed: int = 0) -> tuple[int, int, int]:
    """(bytes, error bytes, pages sampled) of sending every page of ``new`` (lz4 frames,
    zero pages elided); exact (error 0, every page) when asked or when the image has no
    more than SAMPLE_CHUNKS chunks."""
    n = len(new_v)
    chunks = -(-n // CHUNK_PAGES)
    if exact or chunks <= SAMPLE_CHUNKS:
        _, _, full = _core.encode_round(new.pages, new_v, xor=False)
        return full["stored_bytes"], 0, n
    rng = random.Random(seed)
    pages = memoryview(new.pages)
    ratios = []
    for s in range(SAMPLE_CHUNKS):
        c = rng.randrange(s * chunks // SAMPLE_CHUNKS, (s + 1) * chunks // SAMPLE_CHUNKS)
        lo, hi = c * CHUNK_PAGES, min(n, (c + 1) * CHUNK_PAGES)
        _, _, st = _core.encode_round(pages[lo * PAGE_SIZE:hi * PAGE_SIZE], new_v[lo:hi],
                                      xor=False)
        ratios.append(st["stored_bytes"] / (hi - lo))
    mean = sum(ratios) / len(ratios)
    var = sum((r - mean) ** 2 for r in ratios) / (len(ratios) - 1)
    se = math.sqrt(var / len(ratios) * (1 - len(ratios) / chunks))
    return round(mean * n), math.ceil(ERROR_SIGMAS * se * n), SAMPLE_CHUNKS * CHUNK_PAGES


def _diff_memory(old: MemoryImage, new: MemoryImage, exact: bool = False) -> dict:
    old_v, new_v = old.vaddrs(), new.vaddrs()
    cmp = _core.compare_pages(old.pages, old_v, new.pages, new_v)
    old_hashes, _, _ = _core.hash_pages(old.pages)
    common = dict(pages=new.pages, vaddrs=new_v, prev_vaddrs=old_v, prev_hashes=old_hashes,
                  base_pages=old.pages)
    _, _, with_xor = _core.encode_round(xor=True, **common)
    _, _, without_xor = _core.encode_round(xor=False, **common)
    full, error, sampled = _full_image_size(new, new_v, exact)
    return {
        "old_pages": len(old_v), "new_pages": len(new_v), **cmp,
        "image_bytes": len(new_v) * PAGE_SIZE,
        "changed_bytes": cmp["changed"] * PAGE_SIZE,
        # what crosses the wire (frames after lz4), by strategy; the whole image's size
        # is estimated from full_image_sampled_pages pages, within +-its error
        "send_full_image_lz4": full,
        "send_full_image_lz4_error": error,
        "full_image_sampled_pages": sampled,
        "send_delta_full_pages_lz4": without_xor["stored_bytes"],
        "send_delta_xor_lz4": with_xor["stored_bytes"],
        "sent_xor_pages": with_xor["sent_xor"], "sent_full_pages": with_xor["sent_full"],
        "sent_zero_pages": with_xor["sent_zero"],
    }


_SUMMED = ("old_pages", "new_pages", "added", "removed", "changed", "unchanged", "zero",
           "bytes_differing", "image_bytes", "changed_bytes", "send_full_image_lz4",
           "send_delta_full_pages_lz4", "send_delta_xor_lz4", "sent_xor_pages",
           "sent_full_pages", "sent_zero_pages", "send_full_image_lz4_error",
           "full_image_sampled_pages")


def diff_dumps(old_path, new_path, exact: bool = False) -> dict:
    """What changed from the dump at old_path to the one at new_path. The whole-image
    transfer size is an estimate from a sample (``send_full_image_lz4_error``: its error
    bound, summed over processes, 0 where every page was compressed) unless exact."""
    old, new = DumpDir.open(old_path), DumpDir.open(new_path)
    old_pids = {p.pid for p in old.processes}
    new_pids = {p.pid for p in new.processes}
    if not old_pids & new_pids:
        raise ImageError(new_path, f"shares no process with {old_path} (pids {sorted(old_pids)} "
                                   f"vs {sorted(new_pids)}): not two dumps of the same process tree")
    out = {"old": os.path.abspath(old_path), "new": os.path.abspath(new_path),
           "processes_only_in_old": sorted(old_pids - new_pids),
           "processes_only_in_new": sorted(new_pids - old_pids), "memory": []}
    pairs = [(f"pid {pid}", old.memory, new.memory, pid) for pid in sorted(old_pids & new_pids)]
    pairs += [(f"shmem {sid}", old.shmem, new.shmem, sid)
              for sid in sorted(set(old.shmem_ids()) & set(new.shmem_ids()))]
    for label, open_old, open_new, key in pairs:
        with open_old(key) as a, open_new(key) as b:
            out["memory"].append({"what": label, "comm": new.comm(key) if label.startswith("pid") else "",
                                  **_diff_memory(a, b, exact)})
    out["totals"] = {k: sum(m[k] for m in out["memory"]) for k in _SUMMED}
    out["full_image_estimated"] = out["totals"]["full_image_sampled_pages"] < \
        out["totals"]["new_pages"]
    return out


def render_diff(info: dict) -> str:
    lines = [f"{info['old']} -> {info['new']}"]
    for pid in info["processes_only_in_old"]:
        lines.append(f"  pid {pid}: only in the old dump (exited)")
    for pid in info["processes_only_in_new"]:
        lines.append(f"  pid {pid}: only in the new dump (new process; sent whole)")
    for m in info["memory"] + [dict(info["totals"], what="total", comm="")]:
        name = f"{m['what']} ({m['comm']})" if m["comm"] else m["what"]
        lines.append(
            f"  {name}: {m['new_pages']} pages: {m['added']} added, {m['removed']} removed, "
            f"{m['changed']} changed ({_pct(m['changed'], m['new_pages'])}), "
            f"{m['unchanged']} unchanged, {m['zero']} zero")
        if m["changed"]:
            lines.append(f"      changed pages differ in {m['bytes_differing']} of "
                         f"{m['changed_bytes']} bytes ({_pct(m['bytes_differing'], m['changed_bytes'])})")
        whole = _mib(m["send_full_image_lz4"])
        if m["full_image_sampled_pages"] < m["new_pages"]:
            whole = (f"~{whole} +- {_mib(m['send_full_image_lz4_error'])} (estimated from "
                     f"{m['full_image_sampled_pages']} sampled pages; --exact for all)")
        lines.append(
            f"      would send: whole image {whole} (lz4, zero pages "
            f"elided, of {_mib(m['image_bytes'])}); delta {_mib(m['send_delta_full_pages_lz4'])} "
            f"as full pages + lz4, {_mib(m['send_delta_xor_lz4'])} with XOR deltas + lz4")
    return "\n".join(lines) + "\n"
