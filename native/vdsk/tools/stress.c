/*
 * stress: concurrent I/O on one open image, checked against a model.
 *
 *   stress FILE FMT THREADS ITERS SEED EXPECTED_RAW
 *   stress --rss FILE L2_CACHE_BYTES READS     (peak RSS after reads)
 *   stress --convert SRC DST DST_FMT WORKERS CLUSTER
 *       (vdsk_convert with many workers and 64 KiB jobs, for TSan)
 *
 * The image is cut in 4 KiB blocks; every written block holds a tag
 * (block number, write sequence number) repeated, so any read can tell a
 * well-formed block from a torn one.  The model is well defined:
 *   - owned blocks (first half): block b belongs to thread (b/3) % THREADS,
 *     which alone writes it and knows exactly what it must read back;
 *   - shared blocks: any thread writes a run of them holding test-level
 *     per-block locks, recording the last sequence number per block;
 *   - the hot range (16 blocks across a 64 KiB boundary): all threads
 *     overwrite it whole, with no test-level lock: every read and the end
 *     result must show one write's tag in every block (requests are atomic).
 * Reads go anywhere and check well-formedness (owned: exact contents).
 * At the end the whole image is checked and the expected contents are
 * written to EXPECTED_RAW (for qemu-img compare).  Exit 0 if all is well.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vdsk.h"

#define BS      4096u
#define HOT_N   16u
#define HOT_TAG 0xffffffffffffull

static vdsk_t *img;
static uint64_t nblocks, nown, hot0;
static int nthreads, iters;
static uint64_t *model;                 /* last seq per block, 0: none */
static pthread_mutex_t *blk_mu;
static uint64_t seqno;
static int failed;

static void
fail(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	__atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
}

static void
fill(uint8_t *p, uint64_t b, uint64_t seq)
{
	uint64_t w[4] = { b, seq, ~b, ~seq };
	unsigned i;

	for (i = 0; i < BS; i += sizeof(w))
		memcpy(p + i, w, sizeof(w));
}

/* Tag of a block: 1 ok (*seq set, 0 for never written), 0 torn. */
static int
parse(const uint8_t *p, uint64_t b, uint64_t *seq)
{
	uint64_t w[4];
	unsigned i;

	memcpy(w, p, sizeof(w));
	if (w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == 0) {
		for (i = 0; i < BS; i++)
			if (p[i])
				return 0;
		*seq = 0;
		return 1;
	}
	if (w[0] != b || w[2] != ~b || w[3] != ~w[1])
		return 0;
	for (i = sizeof(w); i < BS; i += sizeof(w))
		if (memcmp(p + i, w, sizeof(w)) != 0)
			return 0;
	*seq = w[1];
	return 1;
}

static uint64_t
rnd(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

static int
owner(uint64_t b)
{
	return b < nown ? (int)((b / 3) % (uint64_t)nthreads) : -1;
}

static int
io(int wr, uint8_t *buf, uint64_t b, uint64_t n)
{
	int r = wr ? vdsk_write(img, buf, b * BS, n * BS) :
	    vdsk_read(img, buf, b * BS, n * BS);

	if (r < 0)
		fail("%s blocks %" PRIu64 "+%" PRIu64 ": %s", wr ? "write" :
		    "read", b, n, vdsk_errmsg());
	return r;
}

static void
check_read(int me, uint8_t *buf, uint64_t b0, uint64_t n, uint64_t *hseq)
{
	uint64_t b, seq;

	for (b = b0; b < b0 + n; b++) {
		uint8_t *p = buf + (b - b0) * BS;
		int hot = b >= hot0 && b < hot0 + HOT_N;

		if (!parse(p, hot ? HOT_TAG : b, &seq)) {
			fail("torn block %" PRIu64, b);
			continue;
		}
		if (owner(b) == me && seq != model[b])
			fail("block %" PRIu64 ": seq %" PRIu64 ", expected %"
			    PRIu64, b, seq, model[b]);
		if (hot && hseq != NULL) {
			if (b > b0 && b > hot0 && seq != *hseq)
				fail("hot range mixed: block %" PRIu64 " seq %"
				    PRIu64 " vs %" PRIu64, b, seq, *hseq);
			*hseq = seq;
		}
	}
}

static void *
worker(void *arg)
{
	int me = (int)(intptr_t)arg, it;
	uint64_t s = 0x9e3779b97f4a7c15ULL * (uint64_t)(me + 1), b, n, i, hs;
	uint8_t *buf = malloc(HOT_N * BS);

	for (it = 0; it < iters && !__atomic_load_n(&failed, __ATOMIC_RELAXED); it++) {
		switch (rnd(&s) % 5) {
		case 0:         /* owned write: within one 3-block run */
			do {
				b = rnd(&s) % nown;
			} while (owner(b) != me);
			n = 1 + rnd(&s) % (3 - b % 3);
			for (i = 0; i < n; i++) {
				model[b + i] = __atomic_add_fetch(&seqno, 1,
				    __ATOMIC_RELAXED);
				fill(buf + i * BS, b + i, model[b + i]);
			}
			io(1, buf, b, n);
			break;
		case 1:         /* shared write under test block locks */
			n = 1 + rnd(&s) % 8;
			b = nown + rnd(&s) % (hot0 - nown - n);
			for (i = 0; i < n; i++)
				pthread_mutex_lock(&blk_mu[b + i]);
			for (i = 0; i < n; i++) {
				model[b + i] = __atomic_add_fetch(&seqno, 1,
				    __ATOMIC_RELAXED);
				fill(buf + i * BS, b + i, model[b + i]);
			}
			io(1, buf, b, n);
			for (i = n; i-- > 0;)
				pthread_mutex_unlock(&blk_mu[b + i]);
			break;
		case 2:         /* hot range, whole, no test lock */
			hs = __atomic_add_fetch(&seqno, 1, __ATOMIC_RELAXED);
			for (i = 0; i < HOT_N; i++)
				fill(buf + i * BS, HOT_TAG, hs);
			io(1, buf, hot0, HOT_N);
			break;
		case 3:         /* read the hot range */
			if (io(0, buf, hot0, HOT_N) == 0) {
				hs = 0;
				check_read(me, buf, hot0, HOT_N, &hs);
			}
			break;
		default:        /* read anywhere */
			n = 1 + rnd(&s) % HOT_N;
			b = rnd(&s) % (nblocks - n + 1);
			if (io(0, buf, b, n) == 0) {
				hs = 0;
				check_read(me, buf, b, n, &hs);
			}
			break;
		}
	}
	free(buf);
	return NULL;
}

static int
final_check(const char *expected)
{
	uint8_t *buf = malloc(BS), *want = malloc(BS);
	uint64_t b, seq, hs = 0;
	int fd = open(expected, O_RDWR | O_CREAT | O_TRUNC, 0644);

	if (fd < 0 || ftruncate(fd, (off_t)(nblocks * BS)) < 0) {
		perror(expected);
		return 1;
	}
	for (b = 0; b < nblocks; b++) {
		int hot = b >= hot0 && b < hot0 + HOT_N;

		if (io(0, buf, b, 1) < 0)
			break;
		if (!parse(buf, hot ? HOT_TAG : b, &seq)) {
			fail("final: torn block %" PRIu64, b);
			continue;
		}
		if (hot) {
			if (b > hot0 && seq != hs)
				fail("final: hot range mixed at %" PRIu64, b);
			hs = seq;
		} else if (seq != model[b]) {
			fail("final: block %" PRIu64 " seq %" PRIu64
			    ", model %" PRIu64, b, seq, model[b]);
		}
		seq = hot ? hs : model[b];
		if (seq != 0) {
			fill(want, hot ? HOT_TAG : b, seq);
			if (pwrite(fd, want, BS, (off_t)(b * BS)) != BS)
				fail("writing %s", expected);
		}
	}
	close(fd);
	free(buf);
	free(want);
	return failed;
}

static long
status_kib(const char *key)
{
	char line[256];
	long v = -1;
	FILE *f = fopen("/proc/self/status", "r");

	while (f != NULL && fgets(line, sizeof(line), f) != NULL)
		if (strncmp(line, key, strlen(key)) == 0)
			v = strtol(line + strlen(key) + 1, NULL, 10);
	if (f != NULL)
		fclose(f);
	return v;
}

/* Peak RSS with the image open and READS 4 KiB reads spread over it. */
static int
rss_mode(const char *path, uint64_t cache, uint64_t reads)
{
	struct vdsk_open_opts o = { .l2_cache_size = cache };
	long before = status_kib("VmRSS:");
	uint8_t buf[BS];
	uint64_t i, step;
	vdsk_t *d = vdsk_open2(path, NULL, VDSK_RDONLY, &o);

	if (d == NULL) {
		fprintf(stderr, "stress: %s\n", vdsk_errmsg());
		return 1;
	}
	step = vdsk_size(d) / reads / BS * BS;
	for (i = 0; i < reads; i++)
		if (vdsk_read(d, buf, i * step, BS) < 0) {
			fprintf(stderr, "stress: %s\n", vdsk_errmsg());
			return 1;
		}
	printf("{\"rss_before_kib\": %ld, \"rss_kib\": %ld, "
	    "\"hwm_kib\": %ld}\n", before, status_kib("VmRSS:"),
	    status_kib("VmHWM:"));
	return vdsk_close(d) < 0;
}

int
main(int argc, char **argv)
{
	pthread_t *t;
	uint64_t i;
	int k;

	if (argc == 7 && strcmp(argv[1], "--convert") == 0) {
		struct vdsk_convert_opts o;

		memset(&o, 0, sizeof(o));
		o.workers = atoi(argv[5]);
		o.buf_size = 64u << 10;
		o.cluster_size = (uint32_t)strtoul(argv[6], NULL, 0);
		if (vdsk_convert(argv[2], NULL, argv[3], argv[4], &o) < 0) {
			fprintf(stderr, "stress: %s\n", vdsk_errmsg());
			return 1;
		}
		printf("stress: ok\n");
		return 0;
	}
	if (argc == 5 && strcmp(argv[1], "--rss") == 0)
		return rss_mode(argv[2], strtoull(argv[3], NULL, 0),
		    strtoull(argv[4], NULL, 0));
	if (argc != 7) {
		fprintf(stderr, "usage: stress FILE FMT THREADS ITERS SEED "
		    "EXPECTED_RAW\n       stress --rss FILE L2_CACHE_BYTES "
		    "READS\n       stress --convert SRC DST DST_FMT WORKERS "
		    "CLUSTER\n");
		return 2;
	}
	nthreads = atoi(argv[3]);
	iters = atoi(argv[4]);
	seqno = strtoull(argv[5], NULL, 0) << 32;
	if ((img = vdsk_open(argv[1], argv[2], 0)) == NULL) {
		fprintf(stderr, "stress: %s\n", vdsk_errmsg());
		return 1;
	}
	nblocks = vdsk_size(img) / BS;
	nown = nblocks / 2;
	hot0 = nblocks - 24;
	if (nthreads < 1 || nblocks < 256) {
		fprintf(stderr, "stress: need >= 1 thread, >= 1 MiB image\n");
		return 2;
	}
	model = calloc(nblocks, sizeof(*model));
	blk_mu = calloc(nblocks, sizeof(*blk_mu));
	t = calloc((size_t)nthreads, sizeof(*t));
	for (i = 0; i < nblocks; i++)
		pthread_mutex_init(&blk_mu[i], NULL);
	for (k = 0; k < nthreads; k++)
		pthread_create(&t[k], NULL, worker, (void *)(intptr_t)k);
	for (k = 0; k < nthreads; k++)
		pthread_join(t[k], NULL);
	k = final_check(argv[6]);
	if (vdsk_close(img) < 0) {
		fprintf(stderr, "stress: close: %s\n", vdsk_errmsg());
		k = 1;
	}
	for (i = 0; i < nblocks; i++)
		pthread_mutex_destroy(&blk_mu[i]);
	free(blk_mu);
	free(model);
	free(t);
	printf("stress: %s\n", k ? "FAILED" : "ok");
	return k ? 1 : 0;
}
