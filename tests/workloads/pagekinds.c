/*
 * pagekinds -- a self-checking workload with one kind of page per mode, for the page set
 * (docs/CORE.md, "The page set") against what CRIU dumps, and for real migrations.
 *
 *   pagekinds --modes M[,M...]|all --result PATH [--seed S]
 *
 * Modes (each maps, writes and sometimes re-protects its own memory):
 *   protnone   64 pages written then PROT_NONE
 *   readonly   64 pages written then PROT_READ
 *   sharedanon 64 pages of MAP_SHARED|MAP_ANONYMOUS written by a child that then exits
 *   memfd      a memfd mapped shared (written) and privately (16 pages copied on write)
 *   sysvshm    a SysV shm segment, attached and written (run it in its own IPC namespace)
 *   thp        4 MiB MADV_HUGEPAGE written + 2 MiB MADV_HUGEPAGE only read (zero)
 *   holes      64 pages; MADV_DONTNEED (must read zero), MADV_FREE (old data or zero),
 *              MADV_FREE then written again (the new data)
 *   mremap     32 pages moved elsewhere (MREMAP_FIXED) + 16 pages grown to 48
 *   growsdown  a MAP_GROWSDOWN mapping of 16 pages grown by 8 by a write below it
 *   reserve    1 GiB PROT_NONE MAP_NORESERVE reservation with 256 pages committed inside
 *   manyvmas   5000 pages alternating read-write / read-only: 5000 VMAs
 *   cow        64 pages shared copy-on-write with a forked child that stays; the parent
 *              rewrites half, the child checks it still sees the old ones
 *   uffd       16 pages registered with the process's own userfaultfd (missing mode)
 *   all        every mode above but uffd (CRIU cannot dump an open userfaultfd)
 *
 * Result protocol (as memwork's; PATH replaced atomically):
 *   once ready:  READY modes=<list> pid=<p> <mode>=<vaddr>+<pages> ...
 *   SIGUSR1 ->   OK checked=<pages> modes=<list> pid=<p>
 *                or BAD mode=<m> page=<i> vaddr=0x... why=<word> pid=<p>
 *   SIGTERM ->   exit(0)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define MiB (1024ul * 1024ul)

static size_t PG;
static uint64_t seed = 1;
static const char *result_path;
static char result_tmp[4096];
static volatile sig_atomic_t want_verify, want_exit;
static char ready_extra[8192];
static char modes_arg[512];
static size_t checked;

static void on_signal(int sig)
{
    if (sig == SIGUSR1) want_verify = 1;
    else want_exit = 1;
}

static void write_result(const char *fmt, ...)
{
    char line[9000];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n >= (int)sizeof line) n = sizeof line - 1;
    int fd = open(result_tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return;
    if (write(fd, line, (size_t)n) == n) {
        close(fd);
        rename(result_tmp, result_path);
    } else {
        close(fd);
    }
}

static void die(const char *what)
{
    write_result("FAILED %s errno=%d pid=%d\n", what, errno, (int)getpid());
    perror(what);
    exit(1);
}

static inline uint64_t word(uint64_t tag, size_t p, size_t i)
{
    uint64_t x = (p + 1) * 0x9E3779B97F4A7C15ull ^ (seed << 32) ^ (tag << 48) ^ (i / 8);
    x ^= x >> 29;
    x *= 0xBF58476D1CE4E5B9ull;
    return x ^ (x >> 32) ^ i;
}

static void fill(unsigned char *a, size_t pages, uint64_t tag)
{
    for (size_t p = 0; p < pages; p++) {
        uint64_t *w = (uint64_t *)(a + p * PG);
        for (size_t i = 0; i < PG / 8; i++) w[i] = word(tag, p, i);
    }
}

/* 1: the page holds tag's pattern, 0: it is all zero, -1: neither */
static int page_is(const unsigned char *a, size_t p, uint64_t tag)
{
    const uint64_t *w = (const uint64_t *)(a + p * PG);
    int pattern = 1, zero = 1;
    for (size_t i = 0; i < PG / 8; i++) {
        if (w[i] != word(tag, p, i)) pattern = 0;
        if (w[i]) zero = 0;
        if (!pattern && !zero) return -1;
    }
    checked++;
    return pattern ? 1 : 0;
}

static const char *bad_mode;
static size_t bad_page;
static const void *bad_vaddr;
static const char *bad_why;

static int bad(const char *mode, size_t page, const void *vaddr, const char *why)
{
    bad_mode = mode, bad_page = page, bad_vaddr = vaddr, bad_why = why;
    return -1;
}

/* pages [from, to) must hold tag (want=1) or be zero (want=0) or either (want=2) */
static int expect(const char *mode, const unsigned char *a, size_t from, size_t to,
                  uint64_t tag, int want)
{
    for (size_t p = from; p < to; p++) {
        int got = page_is(a, p, tag);
        if (got < 0) return bad(mode, p, a + p * PG, "garbage");
        if (want != 2 && got != want) return bad(mode, p, a + p * PG, want ? "zero" : "data");
    }
    return 0;
}

static void note(const char *mode, const void *addr, size_t pages)
{
    size_t n = strlen(ready_extra);
    snprintf(ready_extra + n, sizeof ready_extra - n, " %s=%p+%zu", mode, addr, pages);
}

static void *map(size_t len, int prot, int flags)
{
    void *a = mmap(NULL, len, prot, flags | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED) die("mmap");
    return a;
}

/* ------------------------------------------------------------------------- modes */

static unsigned char *pn, *ro, *sa, *mfs, *mfp, *shm, *thp, *thz, *ho, *mv, *gr, *gd,
    *rs, *mvm, *cw, *uf;
static int cow_req[2] = {-1, -1}, cow_rep[2] = {-1, -1};
static pid_t cow_child;

static void setup_protnone(void)
{
    pn = map(64 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE);
    fill(pn, 64, 1);
    if (mprotect(pn, 64 * PG, PROT_NONE)) die("mprotect");
    note("protnone", pn, 64);
}

static int check_protnone(void)
{
    if (mprotect(pn, 64 * PG, PROT_READ)) return bad("protnone", 0, pn, "mprotect");
    int r = expect("protnone", pn, 0, 64, 1, 1);
    mprotect(pn, 64 * PG, PROT_NONE);
    return r;
}

static void setup_readonly(void)
{
    ro = map(64 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE);
    fill(ro, 64, 2);
    if (mprotect(ro, 64 * PG, PROT_READ)) die("mprotect");
    note("readonly", ro, 64);
}

static int check_readonly(void) { return expect("readonly", ro, 0, 64, 2, 1); }

static void setup_sharedanon(void)
{
    sa = map(64 * PG, PROT_READ | PROT_WRITE, MAP_SHARED);
    pid_t c = fork();
    if (c < 0) die("fork");
    if (c == 0) {
        fill(sa, 64, 3);
        _exit(0);
    }
    int st;
    if (waitpid(c, &st, 0) != c || !WIFEXITED(st) || WEXITSTATUS(st)) die("child");
    note("sharedanon", sa, 64);
}

static int check_sharedanon(void) { return expect("sharedanon", sa, 0, 64, 3, 1); }

static void setup_memfd(void)
{
    int fd = memfd_create("pagekinds", 0);
    if (fd < 0) die("memfd_create");
    if (ftruncate(fd, 64 * PG)) die("ftruncate");
    mfs = mmap(NULL, 64 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    mfp = mmap(NULL, 64 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (mfs == MAP_FAILED || mfp == MAP_FAILED) die("mmap memfd");
    fill(mfs, 64, 4);
    for (size_t p = 32; p < 64; p++) (void)*(volatile unsigned char *)(mfp + p * PG);
    fill(mfp, 16, 5);       /* pages 0..15 copied on write; 16..31 never touched */
    note("memfd_shared", mfs, 64);
    note("memfd_private", mfp, 64);
}

static int check_memfd(void)
{
    if (expect("memfd", mfs, 0, 64, 4, 1)) return -1;
    if (expect("memfd", mfp, 0, 16, 5, 1)) return -1;
    return expect("memfd", mfp, 16, 64, 4, 1);
}

static void setup_sysvshm(void)
{
    int id = shmget(IPC_PRIVATE, 64 * PG, IPC_CREAT | 0600);
    if (id < 0) die("shmget");
    shm = shmat(id, NULL, 0);
    if (shm == (void *)-1) die("shmat");
    fill(shm, 64, 6);
    note("sysvshm", shm, 64);
}

static int check_sysvshm(void) { return expect("sysvshm", shm, 0, 64, 6, 1); }

static unsigned char *aligned(size_t len, size_t align)
{
    unsigned char *a = map(len + align, PROT_READ | PROT_WRITE, MAP_PRIVATE);
    unsigned char *b = (unsigned char *)(((uintptr_t)a + align - 1) & ~(uintptr_t)(align - 1));
    if (b > a) munmap(a, (size_t)(b - a));
    if (b + len < a + len + align) munmap(b + len, (size_t)(a + len + align - (b + len)));
    return b;
}

static void setup_thp(void)
{
    thp = aligned(4 * MiB, 2 * MiB);
    madvise(thp, 4 * MiB, MADV_HUGEPAGE);   /* best effort: THP may be off */
    fill(thp, 4 * MiB / PG, 7);
    thz = aligned(2 * MiB, 2 * MiB);
    madvise(thz, 2 * MiB, MADV_HUGEPAGE);
    for (size_t p = 0; p < 2 * MiB / PG; p += 8) (void)*(volatile unsigned char *)(thz + p * PG);
    note("thp", thp, 4 * MiB / PG);
    note("thp_read", thz, 2 * MiB / PG);
}

static int check_thp(void)
{
    if (expect("thp", thp, 0, 4 * MiB / PG, 7, 1)) return -1;
    return expect("thp_read", thz, 0, 2 * MiB / PG, 0, 0);
}

static void setup_holes(void)
{
    ho = map(64 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE);
    fill(ho, 64, 8);
    if (madvise(ho + 8 * PG, 8 * PG, MADV_DONTNEED)) die("MADV_DONTNEED");
    if (madvise(ho + 24 * PG, 8 * PG, MADV_FREE)) die("MADV_FREE");
    if (madvise(ho + 40 * PG, 8 * PG, MADV_FREE)) die("MADV_FREE");
    for (size_t p = 40; p < 44; p++) {
        uint64_t *w = (uint64_t *)(ho + p * PG);
        for (size_t i = 0; i < PG / 8; i++) w[i] = word(9, p, i);
    }
    note("holes", ho, 64);
}

static int check_holes(void)
{
    if (expect("holes", ho, 0, 8, 8, 1) || expect("holes", ho, 8, 16, 8, 0) ||
        expect("holes", ho, 16, 24, 8, 1) || expect("holes", ho, 24, 32, 8, 2) ||
        expect("holes", ho, 32, 40, 8, 1) || expect("holes", ho, 40, 44, 9, 1) ||
        expect("holes", ho, 44, 48, 8, 2))
        return -1;
    return expect("holes", ho, 48, 64, 8, 1);
}

static void setup_mremap(void)
{
    unsigned char *a = map(32 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE);
    fill(a, 32, 10);
    unsigned char *dst = map(64 * PG, PROT_NONE, MAP_PRIVATE);   /* a place to move to */
    mv = mremap(a, 32 * PG, 32 * PG, MREMAP_MAYMOVE | MREMAP_FIXED, dst + 16 * PG);
    if (mv == MAP_FAILED) die("mremap move");
    unsigned char *b = map(16 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE);
    fill(b, 16, 11);
    gr = mremap(b, 16 * PG, 48 * PG, MREMAP_MAYMOVE);
    if (gr == MAP_FAILED) die("mremap grow");
    for (size_t p = 16; p < 32; p++) {
        uint64_t *w = (uint64_t *)(gr + p * PG);
        for (size_t i = 0; i < PG / 8; i++) w[i] = word(11, p, i);
    }
    note("mremap_moved", mv, 32);
    note("mremap_grown", gr, 48);
}

static int check_mremap(void)
{
    if (expect("mremap_moved", mv, 0, 32, 10, 1) || expect("mremap_grown", gr, 0, 32, 11, 1))
        return -1;
    return expect("mremap_grown", gr, 32, 48, 11, 0);
}

static void setup_growsdown(void)
{
    /* room below: more than the kernel's stack guard gap (256 pages) */
    unsigned char *room = map(8 * MiB, PROT_NONE, MAP_PRIVATE);
    munmap(room, 8 * MiB);
    unsigned char *top = room + 8 * MiB - 16 * PG;
    gd = mmap(top, 16 * PG, PROT_READ | PROT_WRITE,
              MAP_PRIVATE | MAP_ANONYMOUS | MAP_GROWSDOWN | MAP_FIXED_NOREPLACE, -1, 0);
    if (gd == MAP_FAILED) die("mmap MAP_GROWSDOWN");
    fill(gd, 16, 12);
    unsigned char *below = gd - 8 * PG;
    for (size_t p = 0; p < 8; p++) {        /* faults below the start: the VMA grows */
        uint64_t *w = (uint64_t *)(below + (7 - p) * PG);
        for (size_t i = 0; i < PG / 8; i++) w[i] = word(13, 7 - p, i);
    }
    gd = below;
    note("growsdown", gd, 24);
}

static int check_growsdown(void)
{
    if (expect("growsdown", gd, 0, 8, 13, 1)) return -1;
    return expect("growsdown", gd + 8 * PG, 0, 16, 12, 1);
}

static void setup_reserve(void)
{
    rs = map(1024 * MiB, PROT_NONE, MAP_PRIVATE | MAP_NORESERVE);
    if (mprotect(rs + 512 * MiB, 256 * PG, PROT_READ | PROT_WRITE)) die("mprotect");
    fill(rs + 512 * MiB, 256, 14);
    note("reserve", rs + 512 * MiB, 256);
}

static int check_reserve(void) { return expect("reserve", rs + 512 * MiB, 0, 256, 14, 1); }

#define MANY 5000
static void setup_manyvmas(void)
{
    mvm = map(MANY * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE);
    fill(mvm, MANY, 15);
    for (size_t p = 1; p < MANY; p += 2)
        if (mprotect(mvm + p * PG, PG, PROT_READ)) die("mprotect manyvmas");
    note("manyvmas", mvm, MANY);
}

static int check_manyvmas(void) { return expect("manyvmas", mvm, 0, MANY, 15, 1); }

static void setup_cow(void)
{
    cw = map(64 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE);
    fill(cw, 64, 16);
    if (pipe(cow_req) || pipe(cow_rep)) die("pipe");
    cow_child = fork();
    if (cow_child < 0) die("fork");
    if (cow_child == 0) {
        signal(SIGUSR1, SIG_IGN);
        signal(SIGTERM, SIG_DFL);
        close(cow_req[1]);
        close(cow_rep[0]);
        char c;
        while (read(cow_req[0], &c, 1) == 1) {
            char r = expect("cow_child", cw, 0, 64, 16, 1) ? 'B' : 'O';
            if (write(cow_rep[1], &r, 1) != 1) break;
        }
        _exit(0);
    }
    close(cow_req[0]);
    close(cow_rep[1]);
    for (size_t p = 0; p < 32; p++) {       /* the parent's own copies of half of them */
        uint64_t *w = (uint64_t *)(cw + p * PG);
        for (size_t i = 0; i < PG / 8; i++) w[i] = word(17, p, i);
    }
    note("cow", cw, 64);
}

static int check_cow(void)
{
    if (expect("cow", cw, 0, 32, 17, 1) || expect("cow", cw, 32, 64, 16, 1)) return -1;
    char c = '?';
    if (write(cow_req[1], &c, 1) != 1) return bad("cow_child", 0, cw, "gone");
    struct pollfd pfd = {cow_rep[0], POLLIN, 0};
    if (poll(&pfd, 1, 20000) != 1 || read(cow_rep[0], &c, 1) != 1)
        return bad("cow_child", 0, cw, "silent");
    return c == 'O' ? 0 : bad("cow_child", 0, cw, "differs");
}

static void setup_uffd(void)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) die("userfaultfd");
    struct uffdio_api api = {.api = UFFD_API};
    if (ioctl(fd, UFFDIO_API, &api)) die("UFFDIO_API");
    uf = map(16 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE);
    fill(uf, 16, 18);
    struct uffdio_register reg = {.range = {(uintptr_t)uf, 16 * PG},
                                  .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(fd, UFFDIO_REGISTER, &reg)) die("UFFDIO_REGISTER");
    note("uffd", uf, 16);
}

static int check_uffd(void) { return expect("uffd", uf, 0, 16, 18, 1); }

struct mode {
    const char *name;
    void (*setup)(void);
    int (*check)(void);
    int in_all, on;
};

static struct mode modes[] = {
    {"protnone", setup_protnone, check_protnone, 1, 0},
    {"readonly", setup_readonly, check_readonly, 1, 0},
    {"sharedanon", setup_sharedanon, check_sharedanon, 1, 0},
    {"memfd", setup_memfd, check_memfd, 1, 0},
    {"sysvshm", setup_sysvshm, check_sysvshm, 1, 0},
    {"thp", setup_thp, check_thp, 1, 0},
    {"holes", setup_holes, check_holes, 1, 0},
    {"mremap", setup_mremap, check_mremap, 1, 0},
    {"growsdown", setup_growsdown, check_growsdown, 1, 0},
    {"reserve", setup_reserve, check_reserve, 1, 0},
    {"manyvmas", setup_manyvmas, check_manyvmas, 1, 0},
    {"cow", setup_cow, check_cow, 1, 0},
    {"uffd", setup_uffd, check_uffd, 0, 0},
};
#define NMODES (sizeof modes / sizeof modes[0])

static void verify(void)
{
    checked = 0;
    for (size_t m = 0; m < NMODES; m++) {
        if (modes[m].on && modes[m].check()) {
            write_result("BAD mode=%s page=%zu vaddr=%p why=%s pid=%d\n", bad_mode, bad_page,
                         bad_vaddr, bad_why, (int)getpid());
            return;
        }
    }
    write_result("OK checked=%zu modes=%s pid=%d\n", checked, modes_arg, (int)getpid());
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--modes") && i + 1 < argc)
            snprintf(modes_arg, sizeof modes_arg, "%s", argv[++i]);
        else if (!strcmp(argv[i], "--seed") && i + 1 < argc) seed = strtoull(argv[++i], 0, 10);
        else if (!strcmp(argv[i], "--result") && i + 1 < argc) result_path = argv[++i];
        else {
            fprintf(stderr, "usage: pagekinds --modes M[,M]|all --result PATH [--seed S]\n");
            return 2;
        }
    }
    if (!modes_arg[0] || !result_path) {
        fprintf(stderr, "pagekinds: --modes and --result needed\n");
        return 2;
    }
    snprintf(result_tmp, sizeof result_tmp, "%s.tmp", result_path);
    PG = (size_t)sysconf(_SC_PAGESIZE);
    char list[512];
    snprintf(list, sizeof list, "%s", modes_arg);
    for (char *save, *t = strtok_r(list, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        int found = 0;
        for (size_t m = 0; m < NMODES; m++)
            if (!strcmp(t, modes[m].name) || (!strcmp(t, "all") && modes[m].in_all))
                modes[m].on = found = 1;
        if (!found) {
            fprintf(stderr, "pagekinds: unknown mode %s\n", t);
            return 2;
        }
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    for (size_t m = 0; m < NMODES; m++)
        if (modes[m].on) modes[m].setup();
    write_result("READY modes=%s pid=%d%s\n", modes_arg, (int)getpid(), ready_extra);
    while (!want_exit) {
        if (want_verify) {
            want_verify = 0;
            verify();
        }
        usleep(20000);
    }
    if (cow_child > 0) {
        kill(cow_child, SIGKILL);
        waitpid(cow_child, NULL, 0);
    }
    return 0;
}
