/*
 * scanwork -- a workload that reads all its memory, over and over, and logs each pass:
 * the process whose speed after a lazy restore shows how long it runs slowed down
 * (the "brownout") while its pages are still being placed.
 *
 *   scanwork --mib N --result PATH --scan-log LOG [--mix K] [--seed S]
 *
 * N MiB of private anonymous memory: every page pseudo-random (seeded by its index),
 * except ~20 % written with zeros (present in a dump, as in most heaps).  The only
 * thread reads every word of every page in order, folding each into a running value
 * with K rounds of a multiply-xor mix (K sets the cost of a pass: K=0 is a plain read).
 * After each pass it appends one line to LOG -- opened, appended and closed, so no file
 * is open for CRIU to carry:
 *
 *   <start> <end> <maxgap> <value>      (CLOCK_REALTIME seconds; a pass starts where
 *                                        the last ended; maxgap: the longest interval
 *                                        between two looks at the clock, one per 64
 *                                        pages: a freeze inside the pass)
 *
 * Result protocol (as memwork's: PATH replaced atomically):
 *   at start:  READY pages=<n> mib=<m> seed=<s> pid=<p>
 *   SIGUSR1 -> check every page against its expected content:
 *              OK pages=<n> checked=<n> passes=<k> pid=<p>  or  BAD page=<i> ...
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
#include <time.h>
#include <unistd.h>

static size_t page_size, words, npages;
static uint64_t seed = 1, passes;
static unsigned mix = 0;
static uint64_t *region;
static const char *result_path, *log_path;
static volatile sig_atomic_t want_verify, want_exit;

static void on_signal(int sig)
{
    if (sig == SIGUSR1)
        want_verify = 1;
    else
        want_exit = 1;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t splitmix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static int is_zero_page(size_t p)
{
    return splitmix(p ^ (seed << 32) ^ 0x7a65726fULL) % 10 < 2;
}

static uint64_t expected(size_t p, size_t w)
{
    return is_zero_page(p) ? 0 : splitmix(seed * 0x100000001b3ULL + p * words + w) | 1;
}

static void write_result(const char *fmt, ...)
{
    char tmp[4096], line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    snprintf(tmp, sizeof tmp, "%s.tmp", result_path);
    FILE *f = fopen(tmp, "w");
    if (!f)
        return;
    fprintf(f, "%s\n", line);
    fclose(f);
    rename(tmp, result_path);
}

static void verify(void)
{
    for (size_t p = 0; p < npages; p++)
        for (size_t w = 0; w < words; w++) {
            uint64_t got = region[p * words + w], want = expected(p, w);
            if (got != want) {
                write_result("BAD page=%zu word=%zu expected=%016" PRIx64 " got=%016" PRIx64
                             " pages=%zu pid=%d", p, w, want, got, npages, (int)getpid());
                return;
            }
        }
    write_result("OK pages=%zu checked=%zu passes=%" PRIu64 " pid=%d", npages, npages,
                 passes, (int)getpid());
}

static void log_pass(double start, double end, double maxgap, uint64_t value)
{
    char line[160];
    int n = snprintf(line, sizeof line, "%.6f %.6f %.6f %016" PRIx64 "\n", start, end, maxgap,
                     value);
    int fd = open(log_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        return;
    if (write(fd, line, (size_t)n) < 0) { /* the next pass tries again */ }
    close(fd);
}

int main(int argc, char **argv)
{
    double mib = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--mib"))
            mib = strtod(argv[i + 1], NULL);
        else if (!strcmp(argv[i], "--result"))
            result_path = argv[i + 1];
        else if (!strcmp(argv[i], "--scan-log"))
            log_path = argv[i + 1];
        else if (!strcmp(argv[i], "--mix"))
            mix = (unsigned)strtoul(argv[i + 1], NULL, 0);
        else if (!strcmp(argv[i], "--seed"))
            seed = strtoull(argv[i + 1], NULL, 0);
        else
            goto usage;
    }
    if (mib <= 0 || !result_path || !log_path || (argc - 1) % 2) {
usage:
        fprintf(stderr, "usage: scanwork --mib N --result PATH --scan-log LOG [--mix K] "
                        "[--seed S]\n");
        return 2;
    }
    page_size = (size_t)sysconf(_SC_PAGESIZE);
    words = page_size / sizeof(uint64_t);
    npages = (size_t)(mib * 1048576.0) / page_size;
    if (!npages)
        npages = 1;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    region = mmap(NULL, npages * page_size, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED)
        return 1;
    for (size_t p = 0; p < npages; p++)
        for (size_t w = 0; w < words; w++)
            region[p * words + w] = expected(p, w);
    write_result("READY pages=%zu mib=%g seed=%" PRIu64 " pid=%d", npages, mib, seed,
                 (int)getpid());
    uint64_t acc = seed;
    double prev_end = now();
    for (;;) {
        /* each pass starts where the last one ended: a stop while one pass is logged
         * counts in the next, none falls between two */
        double start = prev_end, last = start, maxgap = 0;
        for (size_t p = 0; p < npages; p++) {
            if (!(p & 63)) {
                double t = now();
                if (t - last > maxgap)
                    maxgap = t - last;
                last = t;
                if (want_exit)
                    return 0;
                if (want_verify) {
                    want_verify = 0;
                    verify();
                    last = now();      /* a check is not a freeze */
                }
            }
            const uint64_t *pg = region + p * words;
            for (size_t w = 0; w < words; w++) {
                uint64_t x = acc ^ pg[w];
                for (unsigned k = 0; k < mix; k++)
                    x = (x ^ (x >> 29)) * 0xbf58476d1ce4e5b9ULL;
                acc = x + (acc << 1 | acc >> 63);
            }
        }
        double end = now();
        if (end - last > maxgap)
            maxgap = end - last;
        passes++;
        log_pass(start, end, maxgap, acc);
        prev_end = end;
    }
}
