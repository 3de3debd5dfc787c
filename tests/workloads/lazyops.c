/*
 * lazyops -- a self-checking workload that changes its address space all the time, for
 * the lazy restore: right after a restore its pages are still arriving through the
 * userfaultfd server, and it forks, mremaps, discards and unmaps memory in that window.
 *
 *   lazyops --mib N --result PATH [--seed S]
 *
 * Memory (private anonymous, every page a pure function of its index in its region and
 * the seed):  A  N MiB, read by forked children;  B  N/8 MiB, moved with mremap between
 * two reserved places;  C  N/8 MiB, parts discarded with madvise(MADV_DONTNEED) and
 * rewritten;  D  N/8 MiB, parts unmapped and mapped again, then rewritten.
 *
 * It loops, ~1 ms apart: fork a child that checks every 8th page of A and every page of
 * B (exit status 0 = right); move B to its other place and check a page of it; discard 4
 * pages of C, check that they read as zeros (a stale page there would be the bug),
 * rewrite them; unmap 4 pages of D, map them anew, check zeros, rewrite them. A failure
 * is sticky and reported by the next check.
 *
 * Result protocol (as memwork's; PATH replaced atomically):
 *   once ready:  READY pages=<n> mib=<N> seed=<S> pid=<p>
 *   SIGUSR1 ->   check every page of A, B, C, D:
 *                OK pages=<n> cycles=<c> forks=<f> pid=<p>
 *                or BAD what=<...> region=<A|B|C|D> page=<i> cycles=<c> pid=<p>
 *   SIGTERM -> exit(0)
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
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static size_t ps, na, nb;
static uint64_t seed = 1;
static unsigned char *A, *B, *Bspot[2], *C, *D;
static int bcur;
static const char *result_path;
static char result_tmp[4096];
static volatile sig_atomic_t want_verify, want_exit;
static char sticky[256];
static uint64_t cycles, forks;

static void on_signal(int sig)
{
    if (sig == SIGUSR1) want_verify = 1;
    else want_exit = 1;
}

static inline uint64_t word(int region, size_t p, size_t i)
{
    uint64_t x = ((uint64_t)region << 56) ^ (p + 1) * 0x9E3779B97F4A7C15ull ^ (seed << 32) ^ i;
    x ^= x >> 29;
    x *= 0xBF58476D1CE4E5B9ull;
    return x ^ (x >> 32);
}

static void fill(int region, unsigned char *base, size_t p)
{
    uint64_t *w = (uint64_t *)(base + p * ps);
    for (size_t i = 0; i < ps / 8; i++) w[i] = word(region, p, i);
}

static int check(int region, const unsigned char *base, size_t p)
{
    const uint64_t *w = (const uint64_t *)(base + p * ps);
    for (size_t i = 0; i < ps / 8; i++)
        if (w[i] != word(region, p, i)) return 0;
    return 1;
}

static int is_zero(const unsigned char *base, size_t p, size_t n)
{
    const uint64_t *w = (const uint64_t *)(base + p * ps);
    for (size_t i = 0; i < n * ps / 8; i++)
        if (w[i]) return 0;
    return 1;
}

static void write_result(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    int fd = open(result_tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return;
    if (write(fd, line, (size_t)n) == n) {
        close(fd);
        rename(result_tmp, result_path);
    } else {
        close(fd);
    }
}

static void fail(const char *what, char region, size_t page)
{
    if (!sticky[0])
        snprintf(sticky, sizeof sticky, "what=%s region=%c page=%zu cycle=%" PRIu64, what,
                 region, page, cycles);
}

static void cycle(void)
{
    /* a child that reads A (every 8th page) and all of B, in its own copy of memory */
    pid_t c = fork();
    if (c == 0) {
        for (size_t p = 0; p < na; p += 8)
            if (!check('A', A, p)) _exit(10);
        for (size_t p = 0; p < nb; p++)
            if (!check('B', B, p)) _exit(11);
        _exit(0);
    }
    if (c > 0) {
        int st;
        forks++;
        while (waitpid(c, &st, 0) < 0 && errno == EINTR) {}
        if (!WIFEXITED(st) || WEXITSTATUS(st))
            fail(WIFEXITED(st) && WEXITSTATUS(st) == 11 ? "child-read-B" : "child-read-A",
                 WIFEXITED(st) && WEXITSTATUS(st) == 11 ? 'B' : 'A', 0);
    }
    /* move B to its other place */
    unsigned char *to = Bspot[!bcur];
    void *m = mremap(B, nb * ps, nb * ps, MREMAP_MAYMOVE | MREMAP_FIXED, to);
    if (m == MAP_FAILED) {
        fail("mremap", 'B', 0);
    } else {
        B = m;
        bcur = !bcur;
        /* the place it left must stay reserved for the next move */
        if (mmap(Bspot[!bcur], nb * ps, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED |
                 MAP_NORESERVE, -1, 0) == MAP_FAILED)
            fail("mmap-reserve", 'B', 0);
        size_t p = (cycles * 7) % nb;
        if (!check('B', B, p)) fail("after-mremap", 'B', p);
    }
    /* discard 4 pages of C: they must read as zeros, then rewrite them */
    size_t pc = (cycles * 13 * 4) % (nb - 4);
    if (madvise(C + pc * ps, 4 * ps, MADV_DONTNEED)) fail("madvise", 'C', pc);
    if (!is_zero(C, pc, 4)) fail("stale-after-dontneed", 'C', pc);
    for (size_t k = 0; k < 4; k++) fill('C', C, pc + k);
    /* unmap 4 pages of D and map them anew: zeros, then rewrite them */
    size_t pd = (cycles * 11 * 4) % (nb - 4);
    if (munmap(D + pd * ps, 4 * ps)) fail("munmap", 'D', pd);
    if (mmap(D + pd * ps, 4 * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS |
             MAP_FIXED, -1, 0) == MAP_FAILED)
        fail("mmap", 'D', pd);
    else if (!is_zero(D, pd, 4))
        fail("stale-after-munmap", 'D', pd);
    for (size_t k = 0; k < 4; k++) fill('D', D, pd + k);
    cycles++;
}

static void verify(void)
{
    if (sticky[0]) {
        write_result("BAD %s cycles=%" PRIu64 " pid=%d\n", sticky, cycles, (int)getpid());
        return;
    }
    struct { char r; unsigned char *base; size_t n; } regions[] = {
        {'A', A, na}, {'B', B, nb}, {'C', C, nb}, {'D', D, nb}};
    for (int k = 0; k < 4; k++)
        for (size_t p = 0; p < regions[k].n; p++)
            if (!check(regions[k].r, regions[k].base, p)) {
                write_result("BAD what=content region=%c page=%zu cycles=%" PRIu64 " pid=%d\n",
                             regions[k].r, p, cycles, (int)getpid());
                return;
            }
    write_result("OK pages=%zu cycles=%" PRIu64 " forks=%" PRIu64 " pid=%d\n", na + 3 * nb,
                 cycles, forks, (int)getpid());
}

static unsigned char *map_filled(int region, size_t n)
{
    unsigned char *m = mmap(NULL, n * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                            -1, 0);
    if (m == MAP_FAILED) { perror("mmap"); exit(1); }
    for (size_t p = 0; p < n; p++) fill(region, m, p);
    return m;
}

int main(int argc, char **argv)
{
    double mib = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--mib") && i + 1 < argc) mib = atof(argv[++i]);
        else if (!strcmp(argv[i], "--seed") && i + 1 < argc) seed = strtoull(argv[++i], 0, 10);
        else if (!strcmp(argv[i], "--result") && i + 1 < argc) result_path = argv[++i];
        else { fprintf(stderr, "usage: lazyops --mib N --result PATH [--seed S]\n"); return 2; }
    }
    if (mib < 8 || !result_path) { fprintf(stderr, "lazyops: --mib (>= 8) and --result\n"); return 2; }
    snprintf(result_tmp, sizeof result_tmp, "%s.tmp", result_path);
    ps = (size_t)sysconf(_SC_PAGESIZE);
    na = (size_t)(mib * 1048576.0) / ps;
    nb = na / 8;
    A = map_filled('A', na);
    C = map_filled('C', nb);
    D = map_filled('D', nb);
    /* two reserved places for B, apart from each other */
    unsigned char *res = mmap(NULL, 2 * nb * ps, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS |
                              MAP_NORESERVE, -1, 0);
    if (res == MAP_FAILED) { perror("mmap"); return 1; }
    Bspot[0] = res;
    Bspot[1] = res + nb * ps;
    B = mmap(Bspot[0], nb * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
             -1, 0);
    if (B == MAP_FAILED) { perror("mmap"); return 1; }
    for (size_t p = 0; p < nb; p++) fill('B', B, p);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    write_result("READY pages=%zu mib=%g seed=%" PRIu64 " pid=%d\n", na + 3 * nb, mib, seed,
                 (int)getpid());
    struct timespec nap = {0, 1000000};
    while (!want_exit) {
        if (want_verify) {
            want_verify = 0;
            verify();
        }
        cycle();
        nanosleep(&nap, NULL);
    }
    return 0;
}
