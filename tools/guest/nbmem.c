/*
 * nbmem - memory dirtier with a high-rate console tick, for the nova-bhyve
 * test guest (built static by tools/build-test-guest into the initramfs as
 * /bin/nbmem). Used by the migration tests and benchmarks.
 *
 *   nbmem RATE_MIB_S SIZE_MIB [TICK_MS [check]]
 *
 * Allocates SIZE_MIB MiB, touches all of it once, then writes one 8-byte
 * word into successive 4 KiB pages of the buffer (wrapping around), RATE_MIB_S
 * MiB worth of pages per second of CLOCK_MONOTONIC, paced per tick. Every
 * TICK_MS milliseconds (default 10) it writes one line to stdout:
 *
 *   NBMEM <seq> <guest_monotonic_ns>
 *
 * seq counts the lines from 0 with no gaps. A late tick is written at once;
 * ticks missed meanwhile are not written in a burst afterwards (the next one
 * is due TICK_MS after the late one), so a host-side reader takes the
 * longest gap between consecutive lines' arrival as the time the guest did
 * not run (a migration's downtime), and the guest_monotonic_ns difference of
 * the same two lines as what the guest's clock saw of it. Each written word is
 * a fresh counter value, so no page ever goes back to zero (QEMU sends zero
 * pages nearly for free) or to a content it had.
 *
 * First line: NBMEM-START rate_mib_s=R size_mib=S tick_ms=T pid=P
 * On SIGTERM/SIGINT/SIGHUP (kill %1, kill PID, busybox killall nbmem):
 *   NBMEM-STOP seq=N dirtied_mib=M elapsed_ms=E
 * then exit 0. Bad arguments: a usage line on stderr, exit 2; no memory:
 * exit 1.
 *
 * check: keep a shadow copy of every value written and compare the whole
 * buffer with it after each full pass over the buffer and at the stop - the
 * oracle for "memory written while the guest migrated arrived intact" (a
 * hypervisor that loses a write leaves a page with an older value). The
 * start line then also has check=1 and buf=<address> (for a test that
 * corrupts the buffer on purpose through /proc/PID/mem); the stop line has
 * checked=<pages compared> corrupt=<pages that differed>. A difference
 * prints up to 8 lines
 *   NBMEM-CORRUPT page=<index> want=<value written> got=<value found>
 * and ends the program (stop line, exit 3).
 *
 * RATE_MIB_S may be 0 (ticks only). When the guest cannot keep up (e.g. a
 * slow TCG guest), pages are written as fast as it can and NBMEM-STOP tells
 * the rate reached (dirtied_mib / elapsed_ms).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define MIB (1024UL * 1024UL)
#define NS 1000000000ULL
/* pages written between two looks at the clock */
#define BATCH 64
/* NBMEM-CORRUPT lines printed at most */
#define MAX_REPORTS 8

static volatile sig_atomic_t stop_requested;

static void on_signal(int signum)
{
    (void)signum;
    stop_requested = 1;
}

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * NS + (uint64_t)ts.tv_nsec;
}

static void sleep_until(uint64_t deadline)
{
    struct timespec ts = { (time_t)(deadline / NS), (long)(deadline % NS) };

    /* EINTR (a stop signal) just ends the sleep early */
    clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
}

/* write all of buf to fd 1 (the console); unbuffered so that a line leaves
 * the guest when it is due, not when a stdio buffer fills */
static void emit(const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(STDOUT_FILENO, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        buf += n;
        len -= (size_t)n;
    }
}

/* compare every page's first word with what was written into it; print the
 * first differences; return how many pages differ */
static uint64_t verify(const unsigned char *buf, const uint64_t *shadow,
                       uint64_t npages, uint64_t *checked)
{
    uint64_t bad = 0, got;
    char line[128];
    int len;

    for (uint64_t p = 0; p < npages; p++) {
        memcpy(&got, buf + p * PAGE, sizeof(got));
        if (got == shadow[p])
            continue;
        if (bad++ < MAX_REPORTS) {
            len = snprintf(line, sizeof(line),
                           "NBMEM-CORRUPT page=%llu want=%llu got=%llu\n",
                           (unsigned long long)p,
                           (unsigned long long)shadow[p],
                           (unsigned long long)got);
            emit(line, (size_t)len);
        }
    }
    *checked += npages;
    return bad;
}

static int parse(const char *s, unsigned long min, unsigned long max,
                 unsigned long *out)
{
    char *end;
    unsigned long v;

    if (s[0] < '0' || s[0] > '9')
        return -1;
    errno = 0;
    v = strtoul(s, &end, 10);
    if (errno || *end || v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

int main(int argc, char **argv)
{
    unsigned long rate, size_mib, tick_ms = 10;
    uint64_t npages, cursor = 0, written = 0, seq = 0, value = 1;
    uint64_t start, tick_ns, next_tick, now, checked = 0, corrupt = 0;
    uint64_t *shadow = NULL;
    int check = 0;
    double pages_per_ns;
    unsigned char *buf;
    char line[256];
    struct sigaction sa;
    int len;

    if (argc == 5 && strcmp(argv[4], "check") == 0)
        check = 1;
    if (argc < 3 || argc > 4 + check ||
        parse(argv[1], 0, 1UL << 20, &rate) ||
        parse(argv[2], 1, 1UL << 20, &size_mib) ||
        (argc >= 4 && parse(argv[3], 1, 60000, &tick_ms))) {
        fprintf(stderr, "usage: nbmem RATE_MIB_S SIZE_MIB [TICK_MS [check]]\n"
                "  RATE_MIB_S 0..1048576, SIZE_MIB 1..1048576, "
                "TICK_MS 1..60000 (default 10)\n");
        return 2;
    }
    npages = (uint64_t)size_mib * (MIB / PAGE);
    buf = mmap(NULL, (size_t)(npages * PAGE), PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) {
        fprintf(stderr, "nbmem: cannot allocate %lu MiB: %s\n", size_mib,
                strerror(errno));
        return 1;
    }
    if (check) {
        shadow = calloc((size_t)npages, sizeof(*shadow));
        if (shadow == NULL) {
            fprintf(stderr, "nbmem: cannot allocate the check copy\n");
            return 1;
        }
    }
    /* commit every page now: the dirtying later changes resident pages */
    for (uint64_t p = 0; p < npages; p++) {
        memcpy(buf + p * PAGE, &value, sizeof(value));
        if (check)
            shadow[p] = value;
    }

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);

    len = snprintf(line, sizeof(line),
                   "NBMEM-START rate_mib_s=%lu size_mib=%lu tick_ms=%lu "
                   "pid=%ld%s", rate, size_mib, tick_ms, (long)getpid(),
                   check ? "" : "\n");
    if (check)
        len += snprintf(line + len, sizeof(line) - (size_t)len,
                        " check=1 buf=%p\n", (void *)buf);
    emit(line, (size_t)len);

    pages_per_ns = (double)rate * (double)(MIB / PAGE) / (double)NS;
    tick_ns = (uint64_t)tick_ms * 1000000ULL;
    start = now_ns();
    next_tick = start;
    while (!stop_requested) {
        now = now_ns();
        if (now >= next_tick) {
            len = snprintf(line, sizeof(line), "NBMEM %llu %llu\n",
                           (unsigned long long)seq,
                           (unsigned long long)now);
            emit(line, (size_t)len);
            seq++;
            next_tick += tick_ns;
            if (next_tick <= now)            /* missed ticks: no burst */
                next_tick = now + tick_ns;
            continue;
        }
        /* the pages due by now, in batches, until the next tick is due */
        uint64_t due = (uint64_t)((double)(now - start) * pages_per_ns);
        while (written < due && !stop_requested) {
            for (int i = 0; i < BATCH && written < due; i++) {
                value++;
                memcpy(buf + cursor * PAGE, &value, sizeof(value));
                if (check)
                    shadow[cursor] = value;
                cursor = cursor + 1 == npages ? 0 : cursor + 1;
                written++;
                if (check && cursor == 0) {
                    corrupt = verify(buf, shadow, npages, &checked);
                    if (corrupt)
                        stop_requested = 1;
                }
            }
            if (now_ns() >= next_tick)
                break;
        }
        if (written >= due && now_ns() < next_tick)
            sleep_until(next_tick);
    }
    if (check && !corrupt)
        corrupt = verify(buf, shadow, npages, &checked);
    now = now_ns();
    len = snprintf(line, sizeof(line),
                   "NBMEM-STOP seq=%llu dirtied_mib=%llu elapsed_ms=%llu",
                   (unsigned long long)seq,
                   (unsigned long long)(written * PAGE / MIB),
                   (unsigned long long)((now - start) / 1000000ULL));
    if (check)
        len += snprintf(line + len, sizeof(line) - (size_t)len,
                        " checked=%llu corrupt=%llu",
                        (unsigned long long)checked,
                        (unsigned long long)corrupt);
    line[len++] = '\n';
    emit(line, (size_t)len);
    munmap(buf, (size_t)(npages * PAGE));
    free(shadow);
    return corrupt ? 3 : 0;
}
