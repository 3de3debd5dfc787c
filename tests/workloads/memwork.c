/*
 * memwork -- a self-checking memory workload for CRIU migration tests.
 *
 *   memwork --mib N --result PATH [--dirty-mib-per-s R] [--seed S] [--whole-pages]
 *
 * It maps N MiB of private anonymous memory and fills it with a mix of page
 * kinds chosen to exercise every path of a page transfer:
 *
 *   ~40% RANDOM  incompressible xorshift pattern (seeded by page index + seed)
 *   ~20% ZERO    explicitly written with zeros: present in CRIU's dump
 *   ~25% TEXT    compressible text-like lines carrying the page index
 *   ~10% SPARSE  mostly zero with a few words set
 *    ~5% UNTOUCHED never written, so CRIU leaves them out of the dump
 *
 * The kind of a page is a pure function of (page index, seed), and so is its
 * initial content.  A mutator dirties R MiB/s (one page per mutation): it
 * bumps versions[page] and rewrites a fixed set of word slots of the page
 * with values derived from (page, version, seed).  So the full expected
 * content of every page is recomputable from (page, seed, versions[page]);
 * the versions live in this process's own memory, and their sum must equal
 * the mutation counter, so losing either is detected too.
 *
 * Result protocol (PATH is always replaced atomically: PATH.tmp + rename):
 *   at start, once memory is filled:  READY pages=... mib=... seed=... pid=...
 *   SIGUSR1 -> verify every page:     OK pages=<n> checked=<n> mutations=<m> pid=<p>
 *                                     maxgap_us=<g>
 *                                     BAD page=<i> vaddr=0x... ... (first bad pages)
 *   SIGUSR2 ->                        REGION start=0x... pages=N seed=S page_size=P
 *   SIGTERM -> exit(0)  (as PID 1 of its namespace, only handled signals reach it)
 *
 * stdin/stdout/stderr are not used.  No threads, no open files between
 * writes, so that CRIU has nothing but memory to carry.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

enum { K_RANDOM, K_ZERO, K_TEXT, K_SPARSE, K_UNTOUCHED };
static const char *kind_name[] = {"random", "zero", "text", "sparse", "untouched"};

#define MUT_SLOTS 8     /* words rewritten by one mutation */
#define SPARSE_WORDS 4  /* words set in a sparse page */
#define MAX_BAD_LIST 8  /* bad pages named in a BAD line */

static size_t page_size, words_per_page, npages;
static uint64_t seed = 1;
static unsigned char *region;
static uint32_t *versions;          /* per-page mutation version, own memory */
static uint64_t mutations;          /* total mutations == sum(versions) */
static uint64_t mut_cursor, mut_stride;
static const char *result_path;
static char *result_tmp;

static volatile sig_atomic_t want_verify, want_region, want_exit;

static void on_signal(int sig)
{
    if (sig == SIGUSR1)
        want_verify = 1;
    else if (sig == SIGUSR2)
        want_region = 1;
    else
        want_exit = 1;
}

/* splitmix64 finaliser: a cheap, well-mixed hash of 64 bits. */
static inline uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static inline uint64_t mix3(uint64_t a, uint64_t b, uint64_t c)
{
    return mix(a ^ mix(b ^ mix(c ^ seed)));
}

static int page_kind(size_t p)
{
    unsigned r = (unsigned)(mix3(p, 0x6b696e64 /* "kind" */, 0) % 100);
    if (r < 40) return K_RANDOM;
    if (r < 60) return K_ZERO;
    if (r < 85) return K_TEXT;
    if (r < 95) return K_SPARSE;
    return K_UNTOUCHED;
}

/* Word index of mutation slot j of page p; independent of the version so that
 * version v fully overwrites what version v-1 wrote. */
static inline size_t slot_index(size_t p, unsigned j)
{
    return (size_t)(mix3(p, 0x736c6f74 /* "slot" */, j) % words_per_page);
}

static inline uint64_t slot_value(size_t p, uint32_t v, unsigned j)
{
    return mix3(p, ((uint64_t)v << 8) | j, 0x76616c) | 1; /* never zero */
}

/* Write the initial (version 0) content of page p into buf (a whole page). */
static void base_content(size_t p, uint64_t *buf)
{
    switch (page_kind(p)) {
    case K_RANDOM: {
        uint64_t x = mix3(p, 0x726e64 /* "rnd" */, 0) | 1;
        for (size_t i = 0; i < words_per_page; i++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf[i] = x;
        }
        break;
    }
    case K_TEXT: {
        char line[128];
        int n = snprintf(line, sizeof line,
                         "page %010zu seed %" PRIu64 " lorem ipsum dolor sit amet, consectetur\n",
                         p, seed);
        char *c = (char *)buf;
        for (size_t off = 0; off < page_size; off += (size_t)n) {
            size_t len = page_size - off < (size_t)n ? page_size - off : (size_t)n;
            memcpy(c + off, line, len);
        }
        break;
    }
    case K_SPARSE:
        memset(buf, 0, page_size);
        for (unsigned j = 0; j < SPARSE_WORDS; j++)
            buf[mix3(p, 0x737072 /* "spr" */, j) % words_per_page] =
                mix3(p, 0x737076, j) | 1;
        break;
    default: /* K_ZERO, K_UNTOUCHED */
        memset(buf, 0, page_size);
        break;
    }
}

/* --whole-pages: a mutation rewrites the whole page with fresh pseudo-random words
 * (incompressible, no XOR delta helps), a pure function of (page, version, seed). */
static int whole_pages;

static void whole_content(size_t p, uint32_t v, uint64_t *buf)
{
    uint64_t x = mix3(p, v, 0x77686f6c /* "whol" */) | 1;
    for (size_t i = 0; i < words_per_page; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf[i] = x;
    }
}

/* The content page p must have now. */
static void expected_content(size_t p, uint64_t *buf)
{
    uint32_t v = versions[p];
    if (whole_pages && v) {
        whole_content(p, v, buf);
        return;
    }
    base_content(p, buf);
    if (v)
        for (unsigned j = 0; j < MUT_SLOTS; j++)
            buf[slot_index(p, j)] = slot_value(p, v, j);
}

static void write_result(const char *fmt, ...)
{
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof line - 2)
        n = sizeof line - 2;
    line[n++] = '\n';
    int fd = open(result_tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return;
    ssize_t w = write(fd, line, (size_t)n);
    close(fd);
    if (w == n)
        rename(result_tmp, result_path); /* readers see the whole line or nothing */
}

static void fill(void)
{
    uint64_t *buf = aligned_alloc(64, page_size);
    for (size_t p = 0; p < npages; p++) {
        unsigned char *dst = region + p * page_size;
        int k = page_kind(p);
        if (k == K_UNTOUCHED)
            continue;
        base_content(p, buf);
        /* For K_ZERO this writes zeros on purpose: the page must be faulted in
         * (present) even though it reads the same as an untouched one. */
        memcpy(dst, buf, page_size);
    }
    __asm__ volatile("" ::: "memory");
    free(buf);
}

static void mutate_one(void)
{
    /* Walk all pages with a stride coprime to npages: every mutation hits a
     * different page until the walk wraps, so R MiB/s of mutations is R MiB/s
     * of distinct dirty pages, which is what benchmarks want to dial in. */
    size_t p;
    size_t tries = 0;
    do {
        p = (size_t)mut_cursor;
        mut_cursor = (mut_cursor + mut_stride) % npages;
    } while (page_kind(p) == K_UNTOUCHED && ++tries < npages); /* keep them absent */
    if (page_kind(p) == K_UNTOUCHED)
        return;
    uint32_t v = ++versions[p];
    uint64_t *w = (uint64_t *)(region + p * page_size);
    if (whole_pages)
        whole_content(p, v, w);
    else
        for (unsigned j = 0; j < MUT_SLOTS; j++)
            w[slot_index(p, j)] = slot_value(p, v, j);
    mutations++;
}

/* The longest time between two turns of the main loop, as the workload's own clock saw
 * it (verification excluded): the pause a migration caused it, freeze to running again.
 * CLOCK_REALTIME, not MONOTONIC: CRIU restores a PID namespace's tree into a new time
 * namespace whose offsets make CLOCK_MONOTONIC continue from the dump, hiding the pause
 * (both hosts here share one machine clock, so the real-time gap is the pause). */
static double max_gap_s;

static double wall_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void verify(void)
{
    uint64_t *buf = aligned_alloc(64, page_size);
    size_t checked = 0, nbad = 0;
    size_t bad[MAX_BAD_LIST];
    size_t first_word = 0;
    uint64_t exp_w = 0, got_w = 0;
    uint64_t vsum = 0;
    int first_kind = 0;
    uint32_t first_version = 0;

    for (size_t p = 0; p < npages; p++) {
        vsum += versions[p];
        expected_content(p, buf);
        const uint64_t *have = (const uint64_t *)(region + p * page_size);
        checked++;
        if (memcmp(have, buf, page_size) == 0)
            continue;
        if (nbad == 0) {
            for (size_t i = 0; i < words_per_page; i++)
                if (have[i] != buf[i]) {
                    first_word = i;
                    exp_w = buf[i];
                    got_w = have[i];
                    break;
                }
            first_kind = page_kind(p);
            first_version = versions[p];
        }
        if (nbad < MAX_BAD_LIST)
            bad[nbad] = p;
        nbad++;
    }
    free(buf);

    if (nbad) {
        char list[MAX_BAD_LIST * 24] = "";
        size_t off = 0;
        for (size_t i = 0; i < nbad && i < MAX_BAD_LIST; i++)
            off += (size_t)snprintf(list + off, sizeof list - off, "%s%zu", i ? "," : "", bad[i]);
        write_result("BAD page=%zu vaddr=0x%" PRIxPTR " kind=%s version=%" PRIu32
                     " word=%zu expected=0x%016" PRIx64 " got=0x%016" PRIx64
                     " bad_pages=%zu first=%s pages=%zu checked=%zu mutations=%" PRIu64
                     " pid=%d",
                     bad[0], (uintptr_t)(region + bad[0] * page_size), kind_name[first_kind],
                     first_version, first_word, exp_w, got_w, nbad, list, npages, checked,
                     mutations, (int)getpid());
    } else if (vsum != mutations) {
        write_result("BAD reason=versions_sum versions_sum=%" PRIu64 " mutations=%" PRIu64
                     " pages=%zu checked=%zu pid=%d",
                     vsum, mutations, npages, checked, (int)getpid());
    } else {
        write_result("OK pages=%zu checked=%zu mutations=%" PRIu64 " pid=%d maxgap_us=%.0f",
                     npages, checked, mutations, (int)getpid(), max_gap_s * 1e6);
    }
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {0, ms * 1000000L};
    nanosleep(&ts, NULL); /* a signal cuts it short, which is what we want */
}

static uint64_t gcd(uint64_t a, uint64_t b)
{
    while (b) {
        uint64_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

static void usage(void)
{
    fprintf(stderr, "usage: memwork --mib N --result PATH [--dirty-mib-per-s R] [--seed S] "
                    "[--whole-pages]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    double mib = 0, rate = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--whole-pages")) {
            whole_pages = 1;
            continue;
        }
        if (i + 1 >= argc)
            usage();
        if (!strcmp(argv[i], "--mib"))
            mib = strtod(argv[++i], NULL);
        else if (!strcmp(argv[i], "--result"))
            result_path = argv[++i];
        else if (!strcmp(argv[i], "--dirty-mib-per-s"))
            rate = strtod(argv[++i], NULL);
        else if (!strcmp(argv[i], "--seed"))
            seed = strtoull(argv[++i], NULL, 0);
        else
            usage();
    }
    if (mib <= 0 || !result_path || rate < 0)
        usage();

    page_size = (size_t)sysconf(_SC_PAGESIZE);
    words_per_page = page_size / sizeof(uint64_t);
    npages = (size_t)(mib * 1048576.0) / page_size;
    if (npages == 0)
        npages = 1;
    result_tmp = malloc(strlen(result_path) + 5);
    strcpy(result_tmp, result_path);
    strcat(result_tmp, ".tmp");

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal; /* no SA_RESTART: let nanosleep return early */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGUSR2, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    region = mmap(NULL, npages * page_size, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    versions = mmap(NULL, npages * sizeof *versions, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED || versions == MAP_FAILED)
        return 1;
    memset(versions, 0, npages * sizeof *versions); /* present, so it is dumped */
    fill();

    mut_stride = (uint64_t)(npages * 0.6180339887) | 1;
    while (npages > 1 && gcd(mut_stride, npages) != 1)
        mut_stride += 2;
    mut_stride %= npages ? npages : 1;
    if (mut_stride == 0)
        mut_stride = 1;

    write_result("READY pages=%zu mib=%g seed=%" PRIu64 " page_size=%zu pid=%d", npages, mib,
                 seed, page_size, (int)getpid());

    const double pages_per_s = rate * 1048576.0 / (double)page_size;
    double t0 = now_s();
    uint64_t done = 0; /* mutations since t0 */
    double last_turn = wall_s();

    for (;;) {
        double turn = wall_s();
        if (turn - last_turn > max_gap_s)
            max_gap_s = turn - last_turn;
        last_turn = turn;
        if (want_exit)
            return 0;
        if (want_verify) {
            want_verify = 0;
            verify();
            last_turn = wall_s();
        }
        if (want_region) {
            want_region = 0;
            write_result("REGION start=0x%" PRIxPTR " pages=%zu seed=%" PRIu64
                         " page_size=%zu pid=%d",
                         (uintptr_t)region, npages, seed, page_size, (int)getpid());
        }
        if (pages_per_s <= 0) {
            sleep_ms(10); /* idle: no busy loop */
            continue;
        }
        double now = now_s();
        double target = (now - t0) * pages_per_s;
        /* After a freeze (checkpoint, migration, verification) do not burst to
         * catch up: keep at most 100 ms of backlog, then forget the rest. */
        if (target - (double)done > pages_per_s * 0.1) {
            t0 = now - ((double)done / pages_per_s + 0.1);
            target = (now - t0) * pages_per_s;
        }
        /* Bounded batches so that a signal is served within a few ms. */
        for (unsigned batch = 0; (double)done < target && batch < 65536; batch++) {
            mutate_one();
            done++;
        }
        sleep_ms(1); /* pace the work in ~1 ms slices */
    }
}
