/*
 * protnone -- a self-checking workload whose memory is partly PROT_NONE.
 *
 *   protnone --mib N --result PATH [--seed S]
 *
 * It maps N MiB of private anonymous memory, writes every page (a pattern that is a
 * pure function of page index and seed), then mprotects every third block of 16 pages
 * PROT_NONE: pages that hold data but that process_vm_readv cannot read (as guard pages
 * and GC heaps do). A migration must carry them.
 *
 * Result protocol (as memwork's; PATH replaced atomically):
 *   once ready:       READY pages=<n> none_pages=<k> mib=<N> seed=<S> pid=<p>
 *   SIGUSR1 ->        mprotect the PROT_NONE blocks back to read-write, check every
 *                     page, protect them again:  OK pages=<n> checked=<n> none_pages=<k>
 *                     pid=<p>   or   BAD page=<i> vaddr=0x... none=<0|1> pid=<p>
 *   SIGTERM -> exit(0)
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define BLOCK 16

static size_t page_size, npages;
static uint64_t seed = 1;
static unsigned char *region;
static const char *result_path;
static char result_tmp[4096];
static volatile sig_atomic_t want_verify, want_exit;

static void on_signal(int sig)
{
    if (sig == SIGUSR1) want_verify = 1;
    else want_exit = 1;
}

static inline int is_none(size_t p) { return (p / BLOCK) % 3 == 1; }

static inline uint64_t word(size_t p, size_t i)
{
    uint64_t x = (p + 1) * 0x9E3779B97F4A7C15ull ^ (seed << 32) ^ (i / 8);
    x ^= x >> 29;
    x *= 0xBF58476D1CE4E5B9ull;
    return x ^ (x >> 32) ^ i;    /* half-compressible: runs of 8 words share a base */
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

static int protect_blocks(int prot)
{
    for (size_t b = 1; b * BLOCK < npages; b += 3) {
        size_t len = (npages - b * BLOCK < BLOCK ? npages - b * BLOCK : BLOCK) * page_size;
        if (mprotect(region + b * BLOCK * page_size, len, prot)) return -1;
    }
    return 0;
}

static void verify(void)
{
    size_t words = page_size / 8, checked = 0, none = 0;
    if (protect_blocks(PROT_READ | PROT_WRITE)) {
        write_result("BAD mprotect failed pid=%d\n", (int)getpid());
        return;
    }
    for (size_t p = 0; p < npages; p++) {
        const uint64_t *w = (const uint64_t *)(region + p * page_size);
        for (size_t i = 0; i < words; i++) {
            if (w[i] != word(p, i)) {
                write_result("BAD page=%zu vaddr=%p none=%d pid=%d\n", p,
                             (void *)(region + p * page_size), is_none(p), (int)getpid());
                protect_blocks(PROT_NONE);
                return;
            }
        }
        checked++;
        none += is_none(p);
    }
    protect_blocks(PROT_NONE);
    write_result("OK pages=%zu checked=%zu none_pages=%zu pid=%d\n", npages, checked, none,
                 (int)getpid());
}

int main(int argc, char **argv)
{
    double mib = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--mib") && i + 1 < argc) mib = atof(argv[++i]);
        else if (!strcmp(argv[i], "--seed") && i + 1 < argc) seed = strtoull(argv[++i], 0, 10);
        else if (!strcmp(argv[i], "--result") && i + 1 < argc) result_path = argv[++i];
        else { fprintf(stderr, "usage: protnone --mib N --result PATH [--seed S]\n"); return 2; }
    }
    if (mib <= 0 || !result_path) { fprintf(stderr, "protnone: --mib and --result needed\n"); return 2; }
    snprintf(result_tmp, sizeof result_tmp, "%s.tmp", result_path);
    page_size = (size_t)sysconf(_SC_PAGESIZE);
    npages = (size_t)(mib * 1048576.0) / page_size;
    region = mmap(NULL, npages * page_size, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED) { perror("mmap"); return 1; }
    for (size_t p = 0; p < npages; p++) {
        uint64_t *w = (uint64_t *)(region + p * page_size);
        for (size_t i = 0; i < page_size / 8; i++) w[i] = word(p, i);
    }
    if (protect_blocks(PROT_NONE)) { perror("mprotect"); return 1; }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    size_t none = 0;
    for (size_t p = 0; p < npages; p++) none += is_none(p);
    write_result("READY pages=%zu none_pages=%zu mib=%g seed=%" PRIu64 " pid=%d\n", npages,
                 none, mib, seed, (int)getpid());
    while (!want_exit) {
        if (want_verify) {
            want_verify = 0;
            verify();
        }
        usleep(20000);
    }
    return 0;
}
