/*
 * vdsk_bench: the qemu-img bench workload on libvdsk.  'threads' threads
 * share one open image and take request numbers from a common counter, so
 * 'count' is the total like qemu-img's -c and 'threads' plays the role of
 * its queue depth -d.  Write buffers hold 0xa5 bytes (qemu-img bench
 * --pattern=165).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "vdsk_impl.h"

#define MAX_THREADS 256

struct bench {
	struct vdsk *d;
	struct vdsk_bench_opts o;
	uint64_t next;                  /* request counter (atomic) */
	uint64_t span;                  /* size - bs: sequential wrap */
	int err;
	char msg[512];
	pthread_mutex_t mu;
};

struct worker {
	struct bench *b;
	uint64_t rng;
	pthread_t t;
};

static uint64_t
xorshift(uint64_t *s)
{
	uint64_t x = *s;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

static uint64_t
req_offset(struct bench *b, struct worker *w, uint64_t i)
{
	uint64_t blocks;

	if (b->o.random) {
		blocks = (b->d->size - b->o.bs) / b->o.bs + 1;
		return xorshift(&w->rng) % blocks * b->o.bs;
	}
	if (b->span == 0)
		return 0;
	/* qemu-img: offset += step; offset %= size - bs, from o.offset */
	return (uint64_t)(((unsigned __int128)b->o.step * i + b->o.offset) %
	    b->span);
}

static void *
bench_worker(void *arg)
{
	struct worker *w = arg;
	struct bench *b = w->b;
	uint64_t i, off;
	uint8_t *buf;
	int r = 0;

	if (posix_memalign((void **)&buf, 4096, b->o.bs) != 0) {
		r = vdsk_error(ENOMEM, "out of memory");
		goto fail;
	}
	memset(buf, 0xa5, b->o.bs);
	for (;;) {
		i = __atomic_fetch_add(&b->next, 1, __ATOMIC_RELAXED);
		if (i >= b->o.count || __atomic_load_n(&b->err,
		    __ATOMIC_RELAXED))
			break;
		off = req_offset(b, w, i);
		r = b->o.write ? vdsk_write(b->d, buf, off, b->o.bs) :
		    vdsk_read(b->d, buf, off, b->o.bs);
		if (r == 0 && b->o.write && b->o.flush_interval > 0 &&
		    (i + 1) % (uint64_t)b->o.flush_interval == 0)
			r = vdsk_flush(b->d);
		if (r < 0)
			break;
	}
	free(buf);
	if (r == 0)
		return NULL;
fail:
	pthread_mutex_lock(&b->mu);
	if (b->err == 0) {
		snprintf(b->msg, sizeof(b->msg), "%s", vdsk_errmsg());
		__atomic_store_n(&b->err, -r, __ATOMIC_RELAXED);
	}
	pthread_mutex_unlock(&b->mu);
	return NULL;
}

static double
now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int
vdsk_bench(const char *path, const char *fmt,
    const struct vdsk_bench_opts *opts, struct vdsk_bench_result *res)
{
	struct worker *w;
	struct bench b;
	double t0;
	int i, started = 0, r = 0;

	memset(res, 0, sizeof(*res));
	memset(&b, 0, sizeof(b));
	b.o = *opts;
	if (b.o.threads <= 0)
		b.o.threads = 1;
	if (b.o.bs == 0)
		b.o.bs = 4096;
	if (b.o.count == 0)
		b.o.count = 75000;
	if (b.o.step == 0)
		b.o.step = b.o.bs;
	if (b.o.threads > MAX_THREADS || b.o.bs > (64u << 20))
		return vdsk_error(EINVAL, "bench: too many threads or too "
		    "large a block size");
	b.d = vdsk_open(path, fmt, b.o.write ? 0 : VDSK_RDONLY);
	if (b.d == NULL)
		return -vdsk_errno();
	if (b.d->size < b.o.bs || b.o.offset > b.d->size - b.o.bs) {
		vdsk_close(b.d);
		return vdsk_error(EINVAL, "%s: image smaller than offset + "
		    "block size", path);
	}
	b.span = b.d->size - b.o.bs;
	if ((w = calloc((size_t)b.o.threads, sizeof(*w))) == NULL) {
		vdsk_close(b.d);
		return vdsk_error(ENOMEM, "out of memory");
	}
	pthread_mutex_init(&b.mu, NULL);
	t0 = now();
	for (i = 0; i < b.o.threads; i++) {
		w[i].b = &b;
		w[i].rng = (b.o.seed ? b.o.seed : 0x9e3779b97f4a7c15ULL) +
		    (uint64_t)i * 0x2545f4914f6cdd1dULL;
		if (pthread_create(&w[i].t, NULL, bench_worker, &w[i]) != 0)
			break;
		started++;
	}
	for (i = 0; i < started; i++)
		pthread_join(w[i].t, NULL);
	res->seconds = now() - t0;
	pthread_mutex_destroy(&b.mu);
	free(w);
	if (started == 0)
		r = vdsk_error(EAGAIN, "bench: cannot start threads");
	else if (b.err != 0)
		r = vdsk_error(b.err, "%s", b.msg);
	res->requests = b.o.count;
	res->bytes = b.o.count * b.o.bs;
	if (vdsk_close(b.d) < 0 && r == 0)
		r = -vdsk_errno();
	return r;
}
