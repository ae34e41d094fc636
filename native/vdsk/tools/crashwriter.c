/*
 * crashwriter: the writer and the checker of the libvdsk crash
 * consistency test (tests/interop/test_vdsk_crash_consistency.py).
 *
 *   crashwriter init   -f FMT IMAGE STATE FILL_BYTES
 *   crashwriter run    -f FMT IMAGE STATE JOURNAL SEED [DISCARD_ALIGN [OPS]]
 *   crashwriter verify -f FMT IMAGE STATE JOURNAL [NEWSTATE]
 *
 * Every 512-byte sector of the guest holds either zeroes ("generation 0")
 * or the pattern of the write that put it there: pattern(gen, sector),
 * which starts with the generation and the sector number, so a sector
 * read back names the write it came from and any other contents (garbage,
 * a sector of another place or a torn sector) are detected.
 *
 * STATE is the per-sector generation the image is known to hold (written
 * by init and by verify).  run opens IMAGE with libvdsk and does random
 * writes (and, with DISCARD_ALIGN > 0, discards of whole DISCARD_ALIGN
 * blocks, which read as zeroes afterwards, and for qcow2 compressed
 * writes of whole DISCARD_ALIGN clusters), flushing every few requests,
 * until it is killed (or OPS requests are done).  Before each request it
 * appends an intent record to JOURNAL; after each successful vdsk_flush()
 * a FLUSHED record, then it fdatasyncs the journal.
 *
 * verify replays STATE + JOURNAL: a request before the last FLUSHED
 * record was acknowledged and must be there (unless a later request
 * covered the sector); one after it may or may not be, sector by sector
 * (a killed pwrite may be torn at page boundaries).  So every sector must
 * hold the generation of its last acknowledged request or of a later one.
 * It reads IMAGE through libvdsk (-f raw for an export made by qemu-img)
 * and writes the generations it found to NEWSTATE, the next run's STATE.
 * Exit status: 0 good, 1 a mismatch or error (details on stderr).
 *
 * Fault injection (run only): with CRASHWRITER_KILL_AT=N in the
 * environment the writer SIGKILLs itself right before the N-th pwrite(2)
 * libvdsk issues (the tool is linked with -Wl,--wrap=pwrite), after first
 * writing that pwrite's bytes up to the next 4 KiB file offset boundary
 * if CRASHWRITER_TEAR is set - a torn write, as a kill can leave one
 * that spans pages.  That puts a crash between any two writes of the
 * library, which random kill times reach only by luck.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vdsk.h"

#define SECTOR          512
#define WORDS           (SECTOR / 8)
#define STATE_MAGIC     0x5357435644534b31ULL   /* "1KSDVCWS" */
#define REC_MAGIC       0x4352574au
#define R_WRITE         1
#define R_DISCARD       2
#define R_FLUSHED       3
#define MAX_SECTORS     (1u << 24)              /* 8 GiB guests */

struct rec {
	uint32_t magic;
	uint32_t type;
	uint64_t gen;
	uint64_t sector;
	uint32_t nsect;
	uint32_t check;
};

struct state {
	uint64_t sectors;
	uint64_t next_gen;
	uint32_t *gen;
};

static long kill_at;            /* CRASHWRITER_KILL_AT; 0: never */
static int tear;                /* CRASHWRITER_TEAR */
static long pwrites;

ssize_t __real_pwrite(int fd, const void *buf, size_t len, off_t off);
ssize_t __wrap_pwrite(int fd, const void *buf, size_t len, off_t off);

ssize_t
__wrap_pwrite(int fd, const void *buf, size_t len, off_t off)
{
	if (kill_at > 0 && ++pwrites == kill_at) {
		size_t part = 4096 - (size_t)(off & 4095);

		if (tear && part < len)
			(void)__real_pwrite(fd, buf, part, off);
		raise(SIGKILL);
	}
	return __real_pwrite(fd, buf, len, off);
}

static void
die(const char *fmt, const char *arg)
{
	fprintf(stderr, "crashwriter: ");
	fprintf(stderr, fmt, arg);
	fprintf(stderr, "\n");
	exit(1);
}

static void
die_vdsk(const char *what)
{
	fprintf(stderr, "crashwriter: %s: %s\n", what, vdsk_errmsg());
	exit(1);
}

static uint64_t
mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

static void
pattern(uint8_t *p, uint64_t gen, uint64_t sector)
{
	uint64_t w[WORDS], seed = mix(gen * 0x100000001b3ULL ^ sector);
	unsigned i;

	/* compressible, so compressed qcow2 writes stay compressed */
	w[0] = gen;
	w[1] = sector;
	for (i = 2; i < WORDS; i++)
		w[i] = seed + (i & 3);
	memcpy(p, w, SECTOR);
}

/* The generation a sector holds, or -1 if it is no pattern at all. */
static int64_t
identify(const uint8_t *p, uint64_t sector)
{
	static const uint8_t zero[SECTOR];
	uint8_t want[SECTOR];
	uint64_t gen;

	if (memcmp(p, zero, SECTOR) == 0)
		return 0;
	memcpy(&gen, p, 8);
	if (gen == 0 || gen > UINT32_MAX)
		return -1;
	pattern(want, gen, sector);
	return memcmp(p, want, SECTOR) == 0 ? (int64_t)gen : -1;
}

static uint32_t
rec_check(const struct rec *r)
{
	return (uint32_t)mix(r->type ^ r->gen * 3 ^ r->sector * 7 ^
	    (uint64_t)r->nsect * 11);
}

static void
full_write(int fd, const void *buf, size_t len, const char *what)
{
	const uint8_t *p = buf;

	while (len > 0) {
		ssize_t n = write(fd, p, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			die("writing %s failed", what);
		p += n;
		len -= (size_t)n;
	}
}

static void
state_load(const char *path, struct state *st)
{
	uint64_t h[3];
	size_t bytes;
	FILE *f = fopen(path, "rb");

	if (f == NULL || fread(h, 8, 3, f) != 3 || h[0] != STATE_MAGIC ||
	    h[1] == 0 || h[1] > MAX_SECTORS)
		die("%s: not a state file", path);
	st->sectors = h[1];
	st->next_gen = h[2];
	bytes = (size_t)st->sectors * 4;
	if ((st->gen = malloc(bytes)) == NULL ||
	    fread(st->gen, 1, bytes, f) != bytes)
		die("%s: short state file", path);
	fclose(f);
}

static void
state_save(const char *path, const struct state *st)
{
	uint64_t h[3] = { STATE_MAGIC, st->sectors, st->next_gen };
	char tmp[4096];
	int fd;

	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	if ((fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644)) < 0)
		die("%s: cannot create", tmp);
	full_write(fd, h, sizeof(h), tmp);
	full_write(fd, st->gen, (size_t)st->sectors * 4, tmp);
	if (fsync(fd) < 0 || close(fd) < 0 || rename(tmp, path) < 0)
		die("%s: cannot save", path);
}

static vdsk_t *
open_image(const char *path, const char *fmt, int flags, struct state *st)
{
	vdsk_t *d = vdsk_open(path, fmt, flags);

	if (d == NULL)
		die_vdsk("open");
	if (vdsk_size(d) / SECTOR > MAX_SECTORS)
		die("%s: image too large", path);
	if (st != NULL && st->sectors != vdsk_size(d) / SECTOR)
		die("%s: size does not match the state file", path);
	return d;
}

static void
fill_pattern(uint8_t *buf, uint64_t gen, uint64_t sector, uint32_t n)
{
	uint32_t i;

	for (i = 0; i < n; i++)
		pattern(buf + (size_t)i * SECTOR, gen, sector + i);
}

static int
cmd_init(const char *fmt, const char *img, const char *statef,
    uint64_t fill)
{
	struct state st;
	uint8_t *buf;
	uint64_t s, n, chunk = 256;
	uint32_t i;
	vdsk_t *d = open_image(img, fmt, 0, NULL);

	st.sectors = vdsk_size(d) / SECTOR;
	st.next_gen = 2;
	if ((st.gen = calloc(st.sectors, 4)) == NULL ||
	    (buf = malloc(chunk * SECTOR)) == NULL)
		die("%s", "out of memory");
	n = fill / SECTOR < st.sectors ? fill / SECTOR : st.sectors;
	for (s = 0; s < n; s += chunk) {
		uint32_t k = (uint32_t)(n - s < chunk ? n - s : chunk);

		fill_pattern(buf, 1, s, k);
		if (vdsk_write(d, buf, s * SECTOR, (size_t)k * SECTOR) < 0)
			die_vdsk("write");
		for (i = 0; i < k; i++)
			st.gen[s + i] = 1;
	}
	if (vdsk_flush(d) < 0 || vdsk_close(d) < 0)
		die_vdsk("flush/close");
	state_save(statef, &st);
	free(buf);
	free(st.gen);
	return 0;
}

static void
journal_put(int fd, uint32_t type, uint64_t gen, uint64_t sector,
    uint32_t nsect)
{
	struct rec r;

	memset(&r, 0, sizeof(r));
	r.magic = REC_MAGIC;
	r.type = type;
	r.gen = gen;
	r.sector = sector;
	r.nsect = nsect;
	r.check = rec_check(&r);
	/* one write() of 32 bytes: a kill leaves it whole or absent */
	full_write(fd, &r, sizeof(r), "journal");
}

static uint64_t rng_state;

static uint64_t
rnd(uint64_t n)
{
	rng_state = mix(rng_state);
	return n ? rng_state % n : 0;
}

/* A request length in sectors: small, a cluster, or a long run. */
static uint32_t
pick_len(uint64_t max)
{
	uint64_t k = rnd(10), n;

	if (k < 4)
		n = 1 + rnd(16);
	else if (k < 7)
		n = 128;
	else
		n = 1 + rnd(1024);
	return (uint32_t)(n < max ? n : max);
}

static int
cmd_run(const char *fmt, const char *img, const char *statef,
    const char *journalf, uint64_t seed, uint64_t discard_align,
    uint64_t ops)
{
	struct state st;
	uint8_t *buf;
	uint64_t i, gen, s, until_flush, dsect = discard_align / SECTOR;
	uint32_t n;
	int jfd;
	vdsk_t *d;

	state_load(statef, &st);
	rng_state = seed;
	if (getenv("CRASHWRITER_KILL_AT") != NULL)
		kill_at = atol(getenv("CRASHWRITER_KILL_AT"));
	tear = getenv("CRASHWRITER_TEAR") != NULL;
	jfd = open(journalf, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
	if (jfd < 0)
		die("%s: cannot create", journalf);
	d = open_image(img, fmt, 0, &st);
	if ((buf = malloc(1024 * SECTOR)) == NULL)
		die("%s", "out of memory");
	gen = st.next_gen;
	until_flush = 1 + rnd(12);
	for (i = 0; ops == 0 || i < ops; i++) {
		if (dsect && st.sectors >= dsect && rnd(12) == 0) {
			uint64_t blocks = st.sectors / dsect;
			uint64_t b = rnd(blocks), nb = 1 + rnd(4);

			if (nb > blocks - b)
				nb = blocks - b;
			s = b * dsect;
			n = (uint32_t)(nb * dsect);
			journal_put(jfd, R_DISCARD, 0, s, n);
			if (vdsk_discard(d, s * SECTOR, (uint64_t)n * SECTOR)
			    < 0)
				die_vdsk("discard");
		} else if (dsect && st.sectors >= dsect && dsect <= 1024 &&
		    strcmp(fmt, "qcow2") == 0 && rnd(10) == 0) {
			s = rnd(st.sectors / dsect) * dsect;
			n = (uint32_t)dsect;
			fill_pattern(buf, gen, s, n);
			journal_put(jfd, R_WRITE, gen, s, n);
			if (vdsk_write_compressed(d, buf, s * SECTOR,
			    (size_t)n * SECTOR) < 0)
				die_vdsk("compressed write");
			gen++;
		} else {
			n = pick_len(st.sectors);
			s = rnd(st.sectors - n + 1);
			if (n == 128 && rnd(2))
				s &= ~127ULL;   /* cluster aligned */
			fill_pattern(buf, gen, s, n);
			journal_put(jfd, R_WRITE, gen, s, n);
			if (vdsk_write(d, buf, s * SECTOR,
			    (size_t)n * SECTOR) < 0)
				die_vdsk("write");
			gen++;
		}
		if (--until_flush == 0) {
			if (vdsk_flush(d) < 0)
				die_vdsk("flush");
			journal_put(jfd, R_FLUSHED, 0, 0, 0);
			if (fdatasync(jfd) < 0)
				die("%s: fdatasync failed", journalf);
			until_flush = 1 + rnd(12);
		}
	}
	if (vdsk_flush(d) < 0)
		die_vdsk("flush");
	journal_put(jfd, R_FLUSHED, 0, 0, 0);
	if (vdsk_close(d) < 0)
		die_vdsk("close");
	close(jfd);
	free(buf);
	free(st.gen);
	return 0;
}

static struct rec *
journal_load(const char *path, size_t *np)
{
	struct rec *v = NULL, r;
	size_t n = 0, cap = 0;
	FILE *f = fopen(path, "rb");

	if (f == NULL)
		die("%s: cannot open", path);
	while (fread(&r, sizeof(r), 1, f) == 1) {
		if (r.magic != REC_MAGIC || r.check != rec_check(&r) ||
		    r.type < R_WRITE || r.type > R_FLUSHED)
			die("%s: corrupt journal record", path);
		if (n == cap) {
			cap = cap ? 2 * cap : 256;
			if ((v = realloc(v, cap * sizeof(*v))) == NULL)
				die("%s", "out of memory");
		}
		v[n++] = r;
	}
	fclose(f);
	*np = n;
	return v;
}

static int
cmd_verify(const char *fmt, const char *img, const char *statef,
    const char *journalf, const char *newstatef)
{
	struct state st;
	struct rec *j;
	size_t nj, i, last = 0, bad = 0;
	uint64_t s, chunk = 2048, maxgen;
	uint8_t *buf;
	vdsk_t *d;

	state_load(statef, &st);
	j = journal_load(journalf, &nj);
	for (i = 0; i < nj; i++)
		if (j[i].type == R_FLUSHED)
			last = i + 1;
	maxgen = st.next_gen;
	/* acknowledged requests: applied for certain */
	for (i = 0; i < last; i++) {
		if (j[i].type == R_FLUSHED)
			continue;
		if (j[i].sector > st.sectors ||
		    j[i].nsect > st.sectors - j[i].sector)
			die("%s: journal request beyond the image", journalf);
		for (s = j[i].sector; s < j[i].sector + j[i].nsect; s++)
			st.gen[s] = j[i].type == R_WRITE ?
			    (uint32_t)j[i].gen : 0;
	}
	for (i = 0; i < nj; i++)
		if (j[i].type == R_WRITE && j[i].gen + 1 > maxgen)
			maxgen = j[i].gen + 1;
	d = open_image(img, fmt, VDSK_RDONLY, &st);
	if ((buf = malloc(chunk * SECTOR)) == NULL)
		die("%s", "out of memory");
	for (s = 0; s < st.sectors; s += chunk) {
		uint64_t k = st.sectors - s < chunk ? st.sectors - s : chunk, x;

		if (vdsk_read(d, buf, s * SECTOR, k * SECTOR) < 0)
			die_vdsk("read");
		for (x = 0; x < k; x++) {
			uint64_t sec = s + x;
			int64_t got = identify(buf + x * SECTOR, sec);
			int ok = got >= 0 && (uint64_t)got == st.gen[sec];

			/* or a request after the last acknowledged flush */
			for (i = last; !ok && got >= 0 && i < nj; i++) {
				const struct rec *r = &j[i];

				if (r->type == R_FLUSHED || sec < r->sector ||
				    sec >= r->sector + r->nsect)
					continue;
				ok = r->type == R_WRITE ?
				    (uint64_t)got == r->gen : got == 0;
			}
			if (!ok) {
				if (bad++ < 10)
					fprintf(stderr, "crashwriter: sector "
					    "%" PRIu64 ": holds %s%" PRId64
					    ", acknowledged generation %u\n",
					    sec, got < 0 ? "garbage " :
					    "generation ", got,
					    st.gen[sec]);
				continue;
			}
			st.gen[sec] = (uint32_t)got;
		}
	}
	vdsk_close(d);
	free(buf);
	free(j);
	if (bad) {
		fprintf(stderr, "crashwriter: %zu bad sectors (%zu journal "
		    "records, last flush after %zu)\n", bad, nj, last);
		return 1;
	}
	st.next_gen = maxgen;
	if (newstatef != NULL)
		state_save(newstatef, &st);
	free(st.gen);
	printf("ok: %zu journal records, %zu acknowledged\n", nj, last);
	return 0;
}

static uint64_t
num(const char *s)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 0);
	if (errno || *s == '\0' || *end != '\0')
		die("bad number '%s'", s);
	return v;
}

int
main(int argc, char **argv)
{
	const char *cmd, *fmt;

	if (argc < 4 || strcmp(argv[2], "-f") != 0)
		goto usage;
	cmd = argv[1];
	fmt = argv[3];
	argv += 4;
	argc -= 4;
	if (strcmp(cmd, "init") == 0 && argc == 3)
		return cmd_init(fmt, argv[0], argv[1], num(argv[2]));
	if (strcmp(cmd, "run") == 0 && argc >= 4 && argc <= 6)
		return cmd_run(fmt, argv[0], argv[1], argv[2], num(argv[3]),
		    argc > 4 ? num(argv[4]) : 0, argc > 5 ? num(argv[5]) : 0);
	if (strcmp(cmd, "verify") == 0 && (argc == 3 || argc == 4))
		return cmd_verify(fmt, argv[0], argv[1], argv[2],
		    argc == 4 ? argv[3] : NULL);
usage:
	fprintf(stderr, "usage: crashwriter init -f FMT IMAGE STATE "
	    "FILL_BYTES\n       crashwriter run -f FMT IMAGE STATE JOURNAL "
	    "SEED [DISCARD_ALIGN [OPS]]\n       crashwriter verify -f FMT "
	    "IMAGE STATE JOURNAL [NEWSTATE]\n");
	return 2;
}
