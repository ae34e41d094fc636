/*
 * libvdsk image operations built only on the per-format ops, so every
 * format works through them: allocation status, convert, commit, rebase.
 * (External snapshots are vdsk_create() with the current image as the
 * backing file: see nova_bhyve/vdsk.py external_snapshot().)
 */
#define _GNU_SOURCE
#include <sys/stat.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vdsk_impl.h"

#define DEFAULT_BUF     (2u << 20)     /* commit, rebase */
#define CONVERT_BUF     (8u << 20)
#define DEFAULT_WORKERS 1       /* plain copy: one writer (see vdsk_convert) */
#define COMPRESS_WORKERS 2
#define MAX_WORKERS     64
/* Bytes read first to tell a data granule from a zero one (copy_job). */
#define PROBE           512
/* Start the write-back of the destination every this many bytes copied
 * when the convert ends with a flush (see conv_worker). */
#define WRITEBACK_EVERY (64u << 20)

/* ---- allocation status ---- */

static int
status(struct vdsk *d, uint64_t off, uint64_t len, uint64_t *pnum)
{
	int r;

	if (d->ops->block_status == NULL) {
		*pnum = len;
		return VDSK_BS_DATA;
	}
	if (d->ops->threadsafe)
		return d->ops->block_status(d, off, len, pnum);
	vdsk_meta_lock(d);
	r = d->ops->block_status(d, off, len, pnum);
	vdsk_meta_unlock(d);
	return r;
}

int
vdsk_block_status(vdsk_t *d, uint64_t off, uint64_t len, uint64_t *pnum)
{
	*pnum = 0;
	if (len == 0 || off >= d->size || len > d->size - off)
		return vdsk_error(EINVAL, "%s: block status range %#llx+%#llx "
		    "is empty or beyond the virtual size", d->path,
		    (unsigned long long)off, (unsigned long long)len);
	return status(d, off, len, pnum);
}

/* Status through the backing chain: VDSK_BS_DATA or VDSK_BS_ZERO. */
static int
chain_status(struct vdsk *d, uint64_t off, uint64_t len, uint64_t *pnum)
{
	struct vdsk *b = d->backing;
	int st = status(d, off, len, pnum);

	if (st != VDSK_BS_UNALLOCATED)
		return st;
	if (b == NULL || off >= b->size)
		return VDSK_BS_ZERO;
	return chain_status(b, off, *pnum < b->size - off ? *pnum :
	    b->size - off, pnum);
}

/* Read from b, zeroes where it is absent or shorter. */
static int
read_zf(struct vdsk *b, uint8_t *buf, uint64_t off, size_t n)
{
	size_t have = 0;
	int r;

	if (b != NULL && off < b->size) {
		have = b->size - off < n ? (size_t)(b->size - off) : n;
		if ((r = vdsk_read(b, buf, off, have)) < 0)
			return r;
	}
	memset(buf + have, 0, n - have);
	return 0;
}

static int
is_zero(const uint8_t *p, size_t n)
{
	return n == 0 || (p[0] == 0 && memcmp(p, p + 1, n - 1) == 0);
}

/* Carry a worker thread's error to the caller's thread. */
struct err {
	int code;
	char msg[512];
};

static void
err_save(struct err *e, int r)
{
	if (e->code == 0) {
		e->code = -r;
		snprintf(e->msg, sizeof(e->msg), "%s", vdsk_errmsg());
	}
}

/* ---- convert ---- */

struct conv {
	struct vdsk *src, *dst;
	size_t buf_size;
	uint64_t gran;                  /* zero detection granularity */
	int compress;                   /* whole dst clusters, compressed */
	int offload;                    /* copy_job: in-kernel copies */
	int flush;                      /* fsync dst at the end */
	uint64_t unflushed;             /* bytes copied since write-back */
	pthread_mutex_t mu;
	uint64_t pos;                   /* next guest offset to look at */
	struct err err;
};

/* Next range that holds data, at most buf_size long; 0: done. */
static int
next_job(struct conv *c, uint64_t *off, size_t *len)
{
	/* compressed jobs grow to cluster boundaries at both ends */
	uint64_t n, max = c->buf_size - (c->compress ? 2 * c->gran : 0);
	int st, r = 0;

	*len = 0;
	pthread_mutex_lock(&c->mu);
	while (c->err.code == 0 && c->pos < c->src->size) {
		n = c->src->size - c->pos;
		st = chain_status(c->src, c->pos, n < max ? n : max, &n);
		if (st < 0) {
			err_save(&c->err, st);
			r = st;
			break;
		}
		*off = c->pos;
		c->pos += n;
		if (st == VDSK_BS_DATA) {
			if (c->compress) {
				/* whole destination clusters (the previous
				 * job ended on a boundary at or before) */
				*off = *off / c->gran * c->gran;
				c->pos = (c->pos + c->gran - 1) / c->gran *
				    c->gran;
				if (c->pos > c->src->size)
					c->pos = c->src->size;
			}
			*len = (size_t)(c->pos - *off);
			break;
		}
	}
	pthread_mutex_unlock(&c->mu);
	return r;
}

/* Write the non-zero parts of buf (guest offset off). */
static int
write_nonzero(struct conv *c, const uint8_t *buf, uint64_t off, size_t len)
{
	size_t i = 0, j, g;
	int r;

	while (i < len) {
		/* to the next granule boundary (guest offsets) */
		g = (size_t)(c->gran - (off + i) % c->gran);
		if (g > len - i)
			g = len - i;
		if (is_zero(buf + i, g)) {
			i += g;
			continue;
		}
		for (j = i + g; j < len; j += g) {
			g = len - j < c->gran ? len - j : (size_t)c->gran;
			if (is_zero(buf + j, g))
				break;
		}
		if ((r = vdsk_write(c->dst, buf + i, off + i, j - i)) < 0)
			return r;
		i = j;
	}
	return 0;
}

/* Compressed: each non-zero destination cluster in one write. */
static int
write_compressed(struct conv *c, const uint8_t *buf, uint64_t off,
    size_t len)
{
	size_t i, g;
	int r;

	for (i = 0; i < len; i += g) {
		g = len - i < c->gran ? len - i : (size_t)c->gran;
		if (is_zero(buf + i, g))
			continue;
		if ((r = vdsk_write_compressed(c->dst, buf + i, off + i,
		    g)) < 0)
			return r;
	}
	return 0;
}

/*
 * One granule (guest [off, off+g), at host offset h of the source file):
 * 1 if it holds a non-zero byte.  A small probe settles most data
 * granules; only a granule that starts with PROBE zero bytes is read
 * whole (into buf).
 */
static int
granule_has_data(struct conv *c, uint8_t *buf, uint64_t off, uint64_t h,
    size_t g)
{
	size_t n = g < PROBE ? g : PROBE;
	int r;

	if ((r = vdsk_read_fd(c->src->fd, buf, n, h)) == 0 && !is_zero(buf,
	    n)) {
		return 1;
	}
	if (r == 0 && n < g && (r = vdsk_read_fd(c->src->fd, buf + n, g - n,
	    h + n)) == 0)
		return !is_zero(buf + n, g - n);
	if (r < 0)
		return vdsk_error(-r, "%s: reading data for guest offset "
		    "%#llx: %s", c->src->path, (unsigned long long)off,
		    r == -EIO ? "beyond the end of the file" : strerror(-r));
	return 0;
}

/*
 * A job through the kernel (VDSK_CONVERT_COPY_RANGE only): where the
 * source stores the range as plain bytes (raw, uncompressed qcow2
 * clusters), zero granules are found by probing and runs of data granules
 * go from the source file to the destination with copy_file_range (a
 * block clone where the file system shares extents: copy_in).  Other
 * ranges (compressed, backing file...) go through buf.  On ext4 this is
 * a page-cache copy through a pipe and slower than the default buffered
 * job (pread, zero check, pwrite; bench/RESULTS-vdsk-convert.md).
 */
static int
copy_job(struct conv *c, uint8_t *buf, uint64_t off, size_t len)
{
	uint64_t end = off + len, pos, p, h, n, run, g;
	int r;

	for (pos = off; pos < end; pos += n) {
		r = vdsk_host_extent(c->src, pos, end - pos, &h, &n);
		if (r < 0)
			return r;
		if (r == 0) {
			/* n may exceed buf: go through it in pieces */
			if (n > c->buf_size)
				n = c->buf_size;
			if ((r = vdsk_read(c->src, buf, pos, (size_t)n)) < 0 ||
			    (r = write_nonzero(c, buf, pos, (size_t)n)) < 0)
				return r;
			continue;
		}
		/* granules of [pos, pos+n); run: data granules pending */
		run = pos;
		for (p = pos; p < pos + n; p += g) {
			g = c->gran - p % c->gran;
			if (g > pos + n - p)
				g = pos + n - p;
			if ((r = granule_has_data(c, buf, p, h + (p - pos),
			    (size_t)g)) < 0)
				return r;
			if (r == 1)
				continue;
			if (p > run && (r = vdsk_copy_in(c->dst, run,
			    (size_t)(p - run), c->src->fd, h + (run - pos))) < 0)
				return r;
			run = p + g;
		}
		if (p > run && (r = vdsk_copy_in(c->dst, run, (size_t)(p - run),
		    c->src->fd, h + (run - pos))) < 0)
			return r;
	}
	return 0;
}

/*
 * The final fsync would otherwise find all of the output dirty and write
 * it while we wait; starting the write-back as we go lets the disk work
 * while the copy goes on.
 */
static int
writeback_due(struct conv *c, size_t len)
{
	int due;

	pthread_mutex_lock(&c->mu);
	c->unflushed += len;
	due = c->unflushed >= WRITEBACK_EVERY;
	if (due)
		c->unflushed = 0;
	pthread_mutex_unlock(&c->mu);
	return due;
}

static void *
conv_worker(void *arg)
{
	struct conv *c = arg;
	uint8_t *buf;
	uint64_t off;
	size_t len;
	int r;

	if (posix_memalign((void **)&buf, 4096, c->buf_size) != 0) {
		pthread_mutex_lock(&c->mu);
		err_save(&c->err, vdsk_error(ENOMEM, "out of memory"));
		pthread_mutex_unlock(&c->mu);
		return NULL;
	}
	for (;;) {
		if (next_job(c, &off, &len) < 0 || len == 0)
			break;
		if (c->offload) {
			r = copy_job(c, buf, off, len);
			goto done;
		}
		r = vdsk_read(c->src, buf, off, len);
		if (r == 0 && c->compress)
			r = write_compressed(c, buf, off, len);
		else if (r == 0)
			r = write_nonzero(c, buf, off, len);
done:
		if (r < 0) {
			pthread_mutex_lock(&c->mu);
			err_save(&c->err, r);
			pthread_mutex_unlock(&c->mu);
			break;
		}
		if (c->flush && writeback_due(c, len))
			vdsk_start_writeback(c->dst);
	}
	free(buf);
	return NULL;
}

static int
run_workers(struct conv *c, int n)
{
	pthread_t t[MAX_WORKERS];
	int i, started = 0;

	for (i = 1; i < n; i++) {
		if (pthread_create(&t[i], NULL, conv_worker, c) != 0)
			break;
		started++;
	}
	conv_worker(c);
	for (i = 1; i <= started; i++)
		pthread_join(t[i], NULL);
	if (c->err.code != 0)
		return vdsk_error(c->err.code, "%s", c->err.msg);
	return 0;
}

int
vdsk_convert(const char *src, const char *src_fmt, const char *dst,
    const char *dst_fmt, const struct vdsk_convert_opts *opts)
{
	struct vdsk_convert_opts o = { 0, 0, 0, 0 };
	struct vdsk_info inf;
	struct conv c;
	int r, r2;

	if (opts != NULL)
		o = *opts;
	if ((o.flags & VDSK_CONVERT_COMPRESS) &&
	    (dst_fmt == NULL || strcmp(dst_fmt, "qcow2") != 0))
		return vdsk_error(ENOTSUP, "%s: compressed output needs the "
		    "qcow2 format", dst);
	if (o.flags & ~(VDSK_CONVERT_COMPRESS | VDSK_CONVERT_NO_FLUSH |
	    VDSK_CONVERT_COPY_RANGE))
		return vdsk_error(EINVAL, "unknown convert flags %#x", o.flags);
	memset(&c, 0, sizeof(c));
	c.buf_size = o.buf_size ? o.buf_size : CONVERT_BUF;
	if (c.buf_size < 4096 || c.buf_size > (256u << 20))
		return vdsk_error(EINVAL, "convert buffer size must be between "
		    "4 KiB and 256 MiB");
	c.buf_size &= ~(size_t)4095;
	/*
	 * Buffered writes to one file serialise on its inode lock: a second
	 * plain-copy worker only adds contention (bench/RESULTS-vdsk-
	 * convert.md); compression is CPU work that parallelises.
	 */
	if (o.workers <= 0)
		o.workers = (o.flags & VDSK_CONVERT_COMPRESS) ?
		    COMPRESS_WORKERS : DEFAULT_WORKERS;
	if (o.workers > MAX_WORKERS)
		o.workers = MAX_WORKERS;
	if ((c.src = vdsk_open(src, src_fmt, VDSK_RDONLY)) == NULL)
		return -vdsk_errno();
	r = vdsk_create(dst, dst_fmt ? dst_fmt : "raw", c.src->size, NULL,
	    NULL, o.cluster_size);
	if (r == 0 && (c.dst = vdsk_open(dst, dst_fmt ? dst_fmt : "raw",
	    0)) == NULL)
		r = -vdsk_errno();
	if (r < 0) {
		vdsk_close(c.src);
		return r;
	}
	c.gran = 4096;
	if (vdsk_info(c.dst, &inf) == 0 && inf.cluster_size > c.gran)
		c.gran = inf.cluster_size;
	if (o.flags & VDSK_CONVERT_COMPRESS) {
		c.compress = 1;
		c.gran = inf.cluster_size ? inf.cluster_size : 65536;
		/* room for the widening of a job to whole clusters */
		c.buf_size = (c.buf_size + c.gran - 1) / c.gran * c.gran +
		    2 * c.gran;
	}
	/* the probes need a granule's worth of buf */
	c.offload = (o.flags & VDSK_CONVERT_COPY_RANGE) && !c.compress &&
	    c.gran <= c.buf_size &&
	    c.dst->ops->copy_in != NULL &&
	    c.src->ops->host_extent != NULL;
	c.flush = !(o.flags & VDSK_CONVERT_NO_FLUSH);
	pthread_mutex_init(&c.mu, NULL);
	r = run_workers(&c, o.workers);
	pthread_mutex_destroy(&c.mu);
	if (r == 0 && c.flush)
		r = vdsk_flush(c.dst);
	r2 = vdsk_close(c.dst);
	vdsk_close(c.src);
	return r < 0 ? r : r2;
}

/* ---- commit ---- */

static int
copy_range(struct vdsk *from, struct vdsk *to, uint8_t *buf, size_t bsz,
    uint64_t off, uint64_t len)
{
	size_t n;
	int r;

	while (len > 0) {
		n = len < bsz ? (size_t)len : bsz;
		if ((r = vdsk_read(from, buf, off, n)) < 0 ||
		    (r = vdsk_write(to, buf, off, n)) < 0)
			return r;
		off += n;
		len -= n;
	}
	return 0;
}

int
vdsk_commit(const char *path, const char *fmt)
{
	struct vdsk *top, *base = NULL;
	uint64_t pos, n, zn;
	uint8_t *buf = NULL;
	char *bpath;
	int st, r = 0;

	if ((top = vdsk_open(path, fmt, VDSK_RDONLY)) == NULL)
		return -vdsk_errno();
	if (top->backing == NULL) {
		r = vdsk_error(EINVAL, "%s: image has no backing file", path);
		goto out;
	}
	if ((bpath = vdsk_backing_path(top->path, top->backing_file)) == NULL) {
		r = vdsk_error(ENOMEM, "out of memory");
		goto out;
	}
	base = vdsk_open(bpath, top->backing->ops->name, 0);
	free(bpath);
	if (base == NULL) {
		r = -vdsk_errno();
		goto out;
	}
	if ((buf = malloc(DEFAULT_BUF)) == NULL) {
		r = vdsk_error(ENOMEM, "out of memory");
		goto out;
	}
	for (pos = 0; pos < top->size && r == 0; pos += n) {
		st = status(top, pos, top->size - pos, &n);
		if (st < 0) {
			r = st;
			break;
		}
		if (st == VDSK_BS_UNALLOCATED)
			continue;
		if (pos + n > base->size) {
			r = vdsk_error(EFBIG, "%s: data at %#llx is beyond the "
			    "end of the backing file; resize it first", path,
			    (unsigned long long)pos);
			break;
		}
		if (st == VDSK_BS_ZERO) {
			/* nothing to do where the base already reads zero */
			uint64_t p = pos, end = pos + n;

			while (p < end && r == 0) {
				int bst = chain_status(base, p, end - p, &zn);

				if (bst < 0)
					r = bst;
				else if (bst == VDSK_BS_DATA)
					r = copy_range(top, base, buf,
					    DEFAULT_BUF, p, zn);
				p += zn;
			}
		} else {
			r = copy_range(top, base, buf, DEFAULT_BUF, pos, n);
		}
	}
	if (r == 0)
		r = vdsk_flush(base);
out:
	free(buf);
	if (base != NULL && vdsk_close(base) < 0 && r == 0)
		r = -vdsk_errno();
	vdsk_close(top);
	return r;
}

/* ---- rebase ---- */

/* Does the chain of b contain the image d? */
static int
in_chain(const struct vdsk *b, const struct vdsk *d)
{
	for (; b != NULL; b = b->backing)
		if (b->dev == d->dev && b->ino == d->ino)
			return 1;
	return 0;
}

/* Copy into d the clusters of [off, off+len) whose view would change. */
static int
keep_view(struct vdsk *d, struct vdsk *nb, uint8_t *a, uint8_t *b,
    uint64_t off, uint64_t len)
{
	uint64_t g = d->lock_align > 4096 ? d->lock_align : 4096, i, m;
	size_t n;
	int r;

	while (len > 0) {
		n = len < DEFAULT_BUF ? (size_t)len : DEFAULT_BUF;
		if ((r = vdsk_read(d, a, off, n)) < 0 ||
		    (r = read_zf(nb, b, off, n)) < 0)
			return r;
		for (i = 0; i < n; i += m) {
			m = g - (off + i) % g;
			if (m > n - i)
				m = n - i;
			if (memcmp(a + i, b + i, m) != 0 &&
			    (r = vdsk_write(d, a + i, off + i, m)) < 0)
				return r;
		}
		off += n;
		len -= n;
	}
	return 0;
}

int
vdsk_rebase(const char *path, const char *fmt, const char *backing,
    const char *backing_fmt, int unsafe)
{
	struct vdsk *d, *nb = NULL;
	uint8_t *a = NULL, *b = NULL;
	uint64_t pos, n;
	char *bpath = NULL;
	int st, r = 0;

	if (backing != NULL && backing[0] == '\0')
		backing = NULL;
	if (backing_fmt != NULL && backing_fmt[0] == '\0')
		backing_fmt = NULL;
	d = vdsk_open(path, fmt, unsafe ? VDSK_NO_BACKING : 0);
	if (d == NULL)
		return -vdsk_errno();
	if (d->ops->set_backing == NULL) {
		r = vdsk_error(ENOTSUP, "%s: format '%s' has no backing file",
		    path, d->ops->name);
		goto out;
	}
	if (backing != NULL && (!unsafe || backing_fmt == NULL)) {
		if ((bpath = vdsk_backing_path(d->path, backing)) == NULL) {
			r = vdsk_error(ENOMEM, "out of memory");
			goto out;
		}
		nb = vdsk_open(bpath, backing_fmt, VDSK_RDONLY);
		if (nb == NULL) {
			r = -vdsk_errno();
			goto out;
		}
		if (in_chain(nb, d)) {
			r = vdsk_error(ELOOP, "%s: the image would be part of "
			    "its own backing chain", path);
			goto out;
		}
		if (backing_fmt == NULL)
			backing_fmt = nb->ops->name;
	}
	if (!unsafe) {
		if ((a = malloc(DEFAULT_BUF)) == NULL ||
		    (b = malloc(DEFAULT_BUF)) == NULL) {
			r = vdsk_error(ENOMEM, "out of memory");
			goto out;
		}
		for (pos = 0; pos < d->size && r == 0; pos += n) {
			st = status(d, pos, d->size - pos, &n);
			if (st < 0)
				r = st;
			else if (st == VDSK_BS_UNALLOCATED)
				r = keep_view(d, nb, a, b, pos, n);
		}
		if (r == 0)
			r = vdsk_flush(d);
	}
	if (r == 0)
		r = d->ops->set_backing(d, backing, backing_fmt);
out:
	free(a);
	free(b);
	free(bpath);
	if (nb != NULL)
		vdsk_close(nb);
	if (vdsk_close(d) < 0 && r == 0)
		r = -vdsk_errno();
	return r;
}
