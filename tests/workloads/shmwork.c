/*
 * shmwork -- a self-checking process tree with shared memory, for CRIU tests.
 *
 *   shmwork --mib M --result PATH [--private-mib P] [--seed S]
 *
 * What CRIU has to get right here, beyond plain private memory:
 *   - a MAP_SHARED|MAP_ANONYMOUS region of M MiB shared by parent and child
 *     (CRIU dumps it once, as shmem, and must re-share it on restore);
 *   - a process tree: one forked child that keeps incrementing a counter in
 *     the first page of the shared region;
 *   - a multi-threaded task: the parent runs one extra pthread that keeps
 *     incrementing a counter in private memory;
 *   - a private anonymous region of P MiB (default M) with a pattern.
 *
 * Result protocol (PATH replaced atomically: PATH.tmp + rename), as memwork:
 *   READY ...                   once memory is filled and the child runs
 *   SIGUSR1 to the parent -> OK pages=<n> checked=<n> ... pid=<p> | BAD ...
 *       checks both patterns word for word, that the child is alive and its
 *       shared counter advances over 50 ms, and that the thread's counter
 *       advances over the same 50 ms (i.e. both came back running).
 *   SIGUSR2 to the parent -> REGION start=0x<shared> pages=<n>
 *                            private_start=0x... private_pages=<n> seed=<s>
 *   SIGTERM -> exit (the child dies with the PID namespace of its parent).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_BAD_LIST 8

static size_t page_size, words_per_page;
static uint64_t seed = 1;
static const char *result_path;
static char *result_tmp;

static unsigned char *shared;  /* page 0: header, pages 1..: pattern */
static size_t shared_pages;
static unsigned char *priv;
static size_t priv_pages;
static pid_t child;
static volatile uint64_t thread_ticks; /* written by the extra thread only */

struct shm_header {
    volatile uint64_t child_counter; /* written by the child only */
    uint64_t magic;
};
#define SHM_MAGIC 0x73686d776f726b31ULL /* "shmwork1" */

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

static inline uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* Pattern of page p of a region tagged `salt`.  One page in 8 is written
 * zeros (present but empty); the rest is an xorshift stream. */
static void pattern(uint64_t salt, size_t p, uint64_t *buf)
{
    uint64_t x = mix(p ^ mix(salt ^ mix(seed)));
    if ((x & 7) == 0) {
        memset(buf, 0, page_size);
        return;
    }
    x |= 1;
    for (size_t i = 0; i < words_per_page; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf[i] = x;
    }
}

#define SALT_SHARED 0x736861726564ULL /* "shared" */
#define SALT_PRIV 0x70726976ULL       /* "priv" */

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
        rename(result_tmp, result_path);
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Sleep the full time even if signals arrive (for the 50 ms advance check). */
static void sleep_ms_full(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
}

static void *ticker(void *arg)
{
    (void)arg;
    for (;;) {
        thread_ticks++;
        sleep_ms(5);
    }
    return NULL;
}

/* Compare pages [first, first+n) of region r with pattern(salt); record the
 * first bad page.  Returns the number of bad pages. */
struct badinfo {
    size_t n;
    const char *where;
    size_t page;
    uintptr_t vaddr;
    size_t word;
    uint64_t exp, got;
    size_t list[MAX_BAD_LIST];
    size_t nlist;
};

static void check_region(const char *where, unsigned char *r, size_t first, size_t n,
                         uint64_t salt, uint64_t *buf, struct badinfo *b, size_t *checked)
{
    for (size_t p = first; p < n; p++) {
        const uint64_t *have = (const uint64_t *)(r + p * page_size);
        pattern(salt, p, buf);
        (*checked)++;
        if (memcmp(have, buf, page_size) == 0)
            continue;
        if (b->n == 0) {
            b->where = where;
            b->page = p;
            b->vaddr = (uintptr_t)have;
            for (size_t i = 0; i < words_per_page; i++)
                if (have[i] != buf[i]) {
                    b->word = i;
                    b->exp = buf[i];
                    b->got = have[i];
                    break;
                }
        }
        if (b->nlist < MAX_BAD_LIST && b->where == where)
            b->list[b->nlist++] = p;
        b->n++;
    }
}

static void verify(void)
{
    struct shm_header *h = (struct shm_header *)shared;
    uint64_t *buf = aligned_alloc(64, page_size);
    struct badinfo b;
    memset(&b, 0, sizeof b);
    size_t checked = 1; /* the header page, checked by its magic below */

    check_region("shared", shared, 1, shared_pages, SALT_SHARED, buf, &b, &checked);
    check_region("private", priv, 0, priv_pages, SALT_PRIV, buf, &b, &checked);
    free(buf);

    /* Liveness: the child must exist (not reaped, signalable) and both the
     * child and the extra thread must be making progress. */
    int status;
    int child_alive = waitpid(child, &status, WNOHANG) == 0 && kill(child, 0) == 0;
    uint64_t c1 = h->child_counter, t1 = thread_ticks;
    sleep_ms_full(50);
    uint64_t c2 = h->child_counter, t2 = thread_ticks;
    child_alive = child_alive && waitpid(child, &status, WNOHANG) == 0;

    if (b.n) {
        char list[MAX_BAD_LIST * 24] = "";
        size_t off = 0;
        for (size_t i = 0; i < b.nlist; i++)
            off += (size_t)snprintf(list + off, sizeof list - off, "%s%zu", i ? "," : "", b.list[i]);
        write_result("BAD page=%zu vaddr=0x%" PRIxPTR " region=%s word=%zu expected=0x%016" PRIx64
                     " got=0x%016" PRIx64 " bad_pages=%zu first=%s pages=%zu checked=%zu pid=%d",
                     b.page, b.vaddr, b.where, b.word, b.exp, b.got, b.n, list,
                     shared_pages + priv_pages, checked, (int)getpid());
    } else if (h->magic != SHM_MAGIC) {
        write_result("BAD reason=shm_magic magic=0x%016" PRIx64 " pid=%d", h->magic, (int)getpid());
    } else if (!child_alive) {
        write_result("BAD reason=child_dead child=%d pid=%d", (int)child, (int)getpid());
    } else if (c2 <= c1) {
        write_result("BAD reason=child_stalled child=%d child_counter=%" PRIu64 " pid=%d",
                     (int)child, c2, (int)getpid());
    } else if (t2 <= t1) {
        write_result("BAD reason=thread_stalled thread_ticks=%" PRIu64 " pid=%d", t2,
                     (int)getpid());
    } else {
        write_result("OK pages=%zu checked=%zu shared_pages=%zu private_pages=%zu child=%d"
                     " child_counter=%" PRIu64 " thread_ticks=%" PRIu64 " pid=%d",
                     shared_pages + priv_pages, checked, shared_pages, priv_pages, (int)child, c2,
                     t2, (int)getpid());
    }
}

static void usage(void)
{
    fprintf(stderr, "usage: shmwork --mib M --result PATH [--private-mib P] [--seed S]\n");
    exit(2);
}

static size_t mib_to_pages(double mib)
{
    size_t n = (size_t)(mib * 1048576.0) / page_size;
    return n ? n : 1;
}

int main(int argc, char **argv)
{
    double mib = 0, priv_mib = -1;
    for (int i = 1; i < argc; i++) {
        if (i + 1 >= argc)
            usage();
        if (!strcmp(argv[i], "--mib"))
            mib = strtod(argv[++i], NULL);
        else if (!strcmp(argv[i], "--private-mib"))
            priv_mib = strtod(argv[++i], NULL);
        else if (!strcmp(argv[i], "--result"))
            result_path = argv[++i];
        else if (!strcmp(argv[i], "--seed"))
            seed = strtoull(argv[++i], NULL, 0);
        else
            usage();
    }
    if (mib <= 0 || !result_path)
        usage();
    if (priv_mib < 0)
        priv_mib = mib;

    page_size = (size_t)sysconf(_SC_PAGESIZE);
    words_per_page = page_size / sizeof(uint64_t);
    shared_pages = mib_to_pages(mib) + 1; /* +1: header page */
    priv_pages = priv_mib > 0 ? mib_to_pages(priv_mib) : 0;
    result_tmp = malloc(strlen(result_path) + 5);
    strcpy(result_tmp, result_path);
    strcat(result_tmp, ".tmp");

    shared = mmap(NULL, shared_pages * page_size, PROT_READ | PROT_WRITE,
                  MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shared == MAP_FAILED)
        return 1;
    if (priv_pages) {
        priv = mmap(NULL, priv_pages * page_size, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (priv == MAP_FAILED)
            return 1;
    }
    uint64_t *buf = aligned_alloc(64, page_size);
    for (size_t p = 1; p < shared_pages; p++) {
        pattern(SALT_SHARED, p, buf);
        memcpy(shared + p * page_size, buf, page_size);
    }
    for (size_t p = 0; p < priv_pages; p++) {
        pattern(SALT_PRIV, p, buf);
        memcpy(priv + p * page_size, buf, page_size);
    }
    free(buf);
    struct shm_header *h = (struct shm_header *)shared;
    h->magic = SHM_MAGIC;
    h->child_counter = 0;

    child = fork();
    if (child < 0)
        return 1;
    if (child == 0) {
        /* Child: a writer to the shared page, paced so it does not burn a
         * core (1000 increments/s is plenty to see it advance in 50 ms). */
        for (;;) {
            h->child_counter++;
            sleep_ms(1);
        }
    }

    /* The extra thread must not take SIGUSR1/2/TERM: block them while it is
     * created (it inherits the mask), then handle them in the main thread. */
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR1);
    sigaddset(&block, SIGUSR2);
    sigaddset(&block, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &block, &old);
    pthread_t th;
    if (pthread_create(&th, NULL, ticker, NULL) != 0)
        return 1;
    pthread_sigmask(SIG_SETMASK, &old, NULL);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGUSR2, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    write_result("READY pages=%zu shared_pages=%zu private_pages=%zu seed=%" PRIu64
                 " child=%d pid=%d",
                 shared_pages + priv_pages, shared_pages, priv_pages, seed, (int)child,
                 (int)getpid());

    for (;;) {
        if (want_exit) {
            kill(child, SIGKILL);
            waitpid(child, NULL, 0);
            return 0;
        }
        if (want_verify) {
            want_verify = 0;
            verify();
        }
        if (want_region) {
            want_region = 0;
            write_result("REGION start=0x%" PRIxPTR " pages=%zu private_start=0x%" PRIxPTR
                         " private_pages=%zu seed=%" PRIu64 " page_size=%zu pid=%d",
                         (uintptr_t)shared, shared_pages, (uintptr_t)priv, priv_pages, seed,
                         page_size, (int)getpid());
        }
        sleep_ms(10);
    }
}
