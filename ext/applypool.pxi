# Threads applying PAGES payloads to at-index appliers with no Python on them
# (ext/c/applypool.c): the receiving event loop submits, watches `fd`, and takes the
# finished jobs back with done().


cdef class ApplyPool:
    """``threads`` C threads applying frames to at-index PageAppliers.

    submit(applier, frames): queue one payload (its buffer is held until the job
    is taken back; the applier's file stays open while the job works: see
    PageApplier.wait_idle). ``fd`` (an eventfd) is readable when jobs have finished;
    done() returns them as (token, (zero, xor, full)) or (token, exception).
    trim() lets idle threads free their work areas; close() stops the threads; jobs not
    started come back with an error."""
    cdef dx_apply_pool p
    cdef bint started
    cdef dict jobs              # id -> (applier, held buffer): alive while the job is out
    cdef uint64_t next_id

    def __cinit__(self, int threads):
        cdef int rc
        with nogil:
            rc = dx_apply_pool_start(&self.p, threads)
        if rc:
            raise MemoryError(f"ApplyPool: {threads} threads could not be started")
        self.started = True
        self.jobs = {}

    @property
    def fd(self):
        return self.p.efd

    @property
    def inflight(self):
        return len(self.jobs)

    def submit(self, PageApplier applier, frames, size_t max_raw=DX_FRAME_MAX_RAW):
        """Queue frames for applier (at-index mode); returns the job's token."""
        if not self.started:
            raise ValueError("ApplyPool is closed")
        applier._check()
        if applier.mode != DX_APPLY_AT_INDEX or applier.closing:
            raise ValueError("ApplyPool: only an open at-index applier")
        cdef _Buffer fb = bytes_buffer(frames, "frames")
        cdef dx_apply_job *j = <dx_apply_job *>calloc(1, sizeof(dx_apply_job))
        if j == NULL:
            raise MemoryError("ApplyPool")
        self.next_id += 1
        j.a = &applier.a
        j.buf = fb.ptr
        j.len = fb.nbytes
        j.max_raw = max_raw
        j.token = self.next_id
        self.jobs[self.next_id] = (applier, fb)
        applier.busy += 1
        dx_applier_hold(&applier.a)
        dx_apply_pool_submit(&self.p, j)
        return self.next_id

    def done(self):
        """The finished jobs (reads the eventfd): [(token, counts or exception)]."""
        cdef dx_apply_job *j
        cdef dx_apply_job *nxt
        cdef dx_apply_work w
        cdef PageApplier applier
        cdef _Buffer fb
        out = []
        if not self.started:
            return out
        with nogil:
            j = dx_apply_pool_take_done(&self.p)
        while j != NULL:
            nxt = j.next
            applier, fb = self.jobs.pop(j.token)
            if j.rc == 0:
                out.append((j.token, (j.counts[0], j.counts[1], j.counts[2])))
            else:
                memset(&w, 0, sizeof(w))
                w.err_offset, w.err_vaddr, w.err_errno = j.err_offset, j.err_vaddr, j.err_errno
                out.append((j.token, _apply_error(j.rc, &w)))
            applier.busy -= 1
            if applier.closing and not applier.busy:
                applier._free()
            free(j)
            j = nxt
        return out

    def trim(self):
        """Each thread frees its work area (up to a frame's raw size) once it is idle;
        its next job allocates again (the receiver calls this after a live round)."""
        if self.started:
            with nogil:
                dx_apply_pool_trim(&self.p)

    def close(self):
        """Stop and join the threads (a job running finishes first); returns done()."""
        if not self.started:
            return []
        with nogil:
            dx_apply_pool_stop(&self.p)
        out = self.done()
        with nogil:
            dx_apply_pool_free(&self.p)
        self.started = False
        return out

    def __dealloc__(self):
        cdef dx_apply_job *j
        cdef dx_apply_job *nxt
        if self.started:
            with nogil:
                dx_apply_pool_stop(&self.p)
            # the jobs' buffers go with self.jobs
            j = dx_apply_pool_take_done(&self.p)
            while j != NULL:
                nxt = j.next
                free(j)
                j = nxt
            dx_apply_pool_free(&self.p)
