/*
 * libvdsk qcow2: L2/refcount block caches, refcount tables and blocks,
 * cluster allocation.
 */
#define _GNU_SOURCE
#include <sys/stat.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qcow2.h"

/* ---- table cache ---- */

void
qcow2_cache_init(struct tcache *c, const char *what, uint64_t cs, uint64_t budget)
{
	uint64_t n = budget / cs;

	c->what = what;
	c->n = n < 2 ? 2 : n > CACHE_MAX ? CACHE_MAX : (unsigned)n;
}

void
qcow2_cache_free(struct tcache *c)
{
	unsigned i;

	for (i = 0; i < c->n; i++)
		free(c->s[i].data);
	memset(c->s, 0, sizeof(c->s));
}

void
qcow2_cache_drop(struct tcache *c, uint64_t off)
{
	unsigned i;

	for (i = 0; i < c->n; i++)
		if (c->s[i].off == off)
			c->s[i].off = 0;
}

/* Get the cluster at 'off' (read it, or zero it if 'fresh'). */
int
qcow2_cache_get(struct vdsk *d, struct tcache *c, uint64_t off, int fresh,
    uint8_t **out)
{
	struct qcow2 *q = d->priv;
	struct tslot *v = NULL;
	unsigned i;
	int r;

	for (i = 0; i < c->n; i++) {
		if (c->s[i].off == off) {
			c->s[i].lru = ++c->tick;
			if (fresh)
				memset(c->s[i].data, 0, q->cs);
			*out = c->s[i].data;
			return 0;
		}
		if (v == NULL || c->s[i].off == 0 ||
		    (v->off != 0 && c->s[i].lru < v->lru))
			v = &c->s[i];
	}
	if (v->data == NULL && (v->data = malloc(q->cs)) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	v->off = 0;
	if (fresh) {
		memset(v->data, 0, q->cs);
	} else {
		r = vdsk_pread(d, v->data, q->cs, off, c->what);
		if (r < 0)
			return r;
	}
	v->off = off;
	v->lru = ++c->tick;
	*out = v->data;
	return 0;
}

/* ---- refcounts ---- */

static uint64_t
rb_get(const struct qcow2 *q, const uint8_t *b, uint64_t i)
{
	uint32_t w = 1u << q->refcount_order;

	switch (w) {
	case 64: return be64_get(b + i * 8);
	case 32: return be32_get(b + i * 4);
	case 16: return be16_get(b + i * 2);
	case 8: return b[i];
	default:
		return (b[i * w / 8] >> (i * w % 8)) & ((1u << w) - 1);
	}
}

/* Set entry i; return the byte range touched. */
static void
rb_set(const struct qcow2 *q, uint8_t *b, uint64_t i, uint64_t v,
    size_t *boff, size_t *blen)
{
	uint32_t w = 1u << q->refcount_order;

	switch (w) {
	case 64: be64_put(b + i * 8, v); *boff = i * 8; *blen = 8; return;
	case 32: be32_put(b + i * 4, (uint32_t)v); *boff = i * 4; *blen = 4;
		return;
	case 16: be16_put(b + i * 2, (uint16_t)v); *boff = i * 2; *blen = 2;
		return;
	case 8: b[i] = (uint8_t)v; *boff = i; *blen = 1; return;
	default: {
		unsigned sh = (unsigned)(i * w % 8), m = (1u << w) - 1;
		uint8_t *p = &b[i * w / 8];
		*p = (uint8_t)((*p & ~(m << sh)) | ((v & m) << sh));
		*boff = i * w / 8;
		*blen = 1;
	}
	}
}

static int
rt_set(struct vdsk *d, uint64_t idx, uint64_t val)
{
	struct qcow2 *q = d->priv;
	uint8_t e[8];

	q->rt[idx] = val;
	be64_put(e, val);
	return vdsk_pwrite(d, e, 8, q->rt_offset + idx * 8,
	    "refcount table entry");
}

static int
rb_lookup(struct vdsk *d, uint64_t idx, uint64_t *rbo)
{
	struct qcow2 *q = d->priv;

	*rbo = q->rt[idx] & RTE_OFFSET_MASK;
	if ((q->rt[idx] & ~RTE_OFFSET_MASK) != 0 || (*rbo & (q->cs - 1)) ||
	    (*rbo == 0 && q->rt[idx] != 0))
		return vdsk_error(EIO, "%s: corrupt refcount table entry %llu "
		    "(%#llx)", d->path, (unsigned long long)idx,
		    (unsigned long long)q->rt[idx]);
	return 0;
}

int
qcow2_get_refcount(struct vdsk *d, uint64_t host, uint64_t *val)
{
	struct qcow2 *q = d->priv;
	uint64_t cl = host >> q->cluster_bits;
	uint64_t idx = cl >> q->rb_bits, rbo;
	uint8_t *b;
	int r;

	*val = 0;
	if (idx >= q->rt_entries)
		return 0;
	if ((r = rb_lookup(d, idx, &rbo)) < 0 || rbo == 0)
		return r;
	if ((r = qcow2_cache_get(d, &q->rbc, rbo, 0, &b)) < 0)
		return r;
	*val = rb_get(q, b, cl & ((1ULL << q->rb_bits) - 1));
	return 0;
}

static int grow_reftable(struct vdsk *d, uint64_t need_idx);

int
qcow2_set_refcount(struct vdsk *d, uint64_t host, uint64_t val)
{
	struct qcow2 *q = d->priv;
	uint64_t cl = host >> q->cluster_bits;
	uint64_t idx = cl >> q->rb_bits, rbo, self;
	size_t boff, blen;
	uint8_t *b;
	int r;

	if (q->refcount_order < 6 && val >> (1u << q->refcount_order))
		return vdsk_error(ERANGE, "%s: refcount overflow at %#llx "
		    "(refcount_bits=%u)", d->path, (unsigned long long)host,
		    1u << q->refcount_order);
	if (val == 0) {
		qcow2_cache_drop(&q->l2c, host);
		qcow2_cache_drop(&q->rbc, host);
		if (cl < q->free_hint)
			q->free_hint = cl;
		if (q->comp_cur && (q->comp_cur >> q->cluster_bits) == cl)
			q->comp_cur = 0;
		q->dbuf_entry = 0;
	}
	if (idx >= q->rt_entries) {
		if (val == 0)
			return 0;
		if ((r = grow_reftable(d, idx)) < 0)
			return r;
	}
	if ((r = rb_lookup(d, idx, &rbo)) < 0)
		return r;
	if (rbo == 0) {
		if (val == 0)
			return 0;
		/*
		 * New refcount block at the end of the file.  Its own
		 * refcount is on disk before the refcount table points to
		 * it (in the block itself if it covers itself), so a crash
		 * in between leaks the cluster instead of leaving a
		 * referenced cluster with refcount 0.
		 */
		rbo = q->next_free;
		if (rbo >= MAX_HOST_OFFSET)
			return vdsk_error(EFBIG, "%s: image file too large",
			    d->path);
		q->next_free += q->cs;
		self = rbo >> q->cluster_bits;
		if ((self >> q->rb_bits) != idx &&
		    (r = qcow2_set_refcount(d, rbo, 1)) < 0)
			return r;
		if ((r = qcow2_cache_get(d, &q->rbc, rbo, 1, &b)) < 0)
			return r;
		if ((self >> q->rb_bits) == idx)
			rb_set(q, b, self & ((1ULL << q->rb_bits) - 1), 1,
			    &boff, &blen);
		if ((r = vdsk_pwrite(d, b, q->cs, rbo, "refcount block")) < 0)
			return r;
		if ((r = rt_set(d, idx, rbo)) < 0)
			return r;
	}
	/* the recursion above may have evicted it: look it up again */
	if ((r = qcow2_cache_get(d, &q->rbc, rbo, 0, &b)) < 0)
		return r;
	rb_set(q, b, cl & ((1ULL << q->rb_bits) - 1), val, &boff, &blen);
	return vdsk_pwrite(d, b + boff, blen, rbo + boff, "refcount");
}

/*
 * Refcount 1 for the n clusters at host (newly allocated, all 0 before):
 * per refcount block, all set in the cached block and written with one
 * pwrite of the byte range they cover.  Where the block does not exist
 * yet, the first goes through qcow2_set_refcount(), which allocates it.
 */
static int
set_refcount_run(struct vdsk *d, uint64_t host, uint64_t n)
{
	struct qcow2 *q = d->priv;
	uint64_t cl, m, i, rbo, idx, mask = (1ULL << q->rb_bits) - 1;
	size_t boff, blen, lo, hi;
	uint8_t *b;
	int r;

	while (n > 0) {
		cl = host >> q->cluster_bits;
		idx = cl >> q->rb_bits;
		m = (mask + 1) - (cl & mask);
		if (m > n)
			m = n;
		i = 0;
		if (idx >= q->rt_entries || q->rt[idx] == 0) {
			if ((r = qcow2_set_refcount(d, host, 1)) < 0)
				return r;
			i = 1;
		}
		if (i < m) {
			if ((r = rb_lookup(d, idx, &rbo)) < 0)
				return r;
			if ((r = qcow2_cache_get(d, &q->rbc, rbo, 0, &b)) < 0)
				return r;
			lo = SIZE_MAX;
			hi = 0;
			for (; i < m; i++) {
				rb_set(q, b, (cl + i) & mask, 1, &boff, &blen);
				if (boff < lo)
					lo = boff;
				if (boff + blen > hi)
					hi = boff + blen;
			}
			if ((r = vdsk_pwrite(d, b + lo, hi - lo, rbo + lo,
			    "refcounts")) < 0)
				return r;
		}
		host += m << q->cluster_bits;
		n -= m;
	}
	return 0;
}

int
qcow2_update_refcount(struct vdsk *d, uint64_t off, uint64_t len, int addend)
{
	struct qcow2 *q = d->priv;
	uint64_t c, end = off + len, rc;
	int r;

	for (c = off & ~(q->cs - 1); c < end; c += q->cs) {
		if ((r = qcow2_get_refcount(d, c, &rc)) < 0)
			return r;
		if (addend < 0 && rc < (uint64_t)-addend)
			return vdsk_error(EIO, "%s: corrupt image: refcount of "
			    "cluster %#llx would drop below zero", d->path,
			    (unsigned long long)c);
		if ((r = qcow2_set_refcount(d, c, rc + (int64_t)addend)) < 0)
			return r;
	}
	return 0;
}

int
qcow2_load_rt(struct vdsk *d)
{
	struct qcow2 *q = d->priv;

	if (q->rt != NULL)
		return 0;
	q->rt_entries = ((uint64_t)q->rt_clusters << q->cluster_bits) / 8;
	return qcow2_load_table(d, q->rt_offset, q->rt_entries, &q->rt,
	    "refcount table");
}

/*
 * Reserve n contiguous clusters, refcount 1: the first free run (refcount
 * 0) inside the file, else at the end of the file.
 */
int
qcow2_alloc_clusters(struct vdsk *d, uint64_t n, uint64_t *off)
{
	struct qcow2 *q = d->priv;
	uint64_t cl, end = q->next_free >> q->cluster_bits, run = 0, start;
	uint64_t rc;
	int r;

	*off = 0;
	start = cl = q->free_hint;
	for (; cl < end && run < n; cl++) {
		if ((r = qcow2_get_refcount(d, cl << q->cluster_bits,
		    &rc)) < 0)
			return r;
		if (rc != 0) {
			run = 0;
			start = cl + 1;
		} else {
			run++;
		}
	}
	if (run == 0 && start < q->free_hint)
		start = q->free_hint;
	if (run == n || (run > 0 && cl == end)) {
		*off = start << q->cluster_bits;
		if (start + n > end)
			q->next_free = (start + n) << q->cluster_bits;
		if (start == q->free_hint)
			q->free_hint = start + n;
		return set_refcount_run(d, *off, n);
	}
	q->free_hint = end;
	if (q->next_free >= MAX_HOST_OFFSET ||
	    n > (MAX_HOST_OFFSET - q->next_free) >> q->cluster_bits)
		return vdsk_error(EFBIG, "%s: image file too large", d->path);
	*off = q->next_free;
	q->next_free += n << q->cluster_bits;
	return set_refcount_run(d, *off, n);
}

/*
 * Move the refcount table to a bigger one at the end of the file.  The new
 * table is sized to also cover its own clusters and the refcount blocks
 * they may need, so this never recurses.
 */
static int
grow_reftable(struct vdsk *d, uint64_t need_idx)
{
	struct qcow2 *q = d->priv;
	uint32_t cov = q->cluster_bits + q->rb_bits;
	uint64_t ne, nb = 0, end, need, new_off, old_off, i, *nrt;
	uint32_t old_clusters = q->rt_clusters;
	uint8_t *buf, hdr[12];
	int r;

	if (q->growing)
		return vdsk_error(EFBIG, "%s: refcount table growth loop",
		    d->path);
	ne = q->rt_entries * 2 > need_idx + 1 ? q->rt_entries * 2 :
	    need_idx + 1;
	for (;;) {
		if (ne > MAX_RT_BYTES / 8)
			return vdsk_error(EFBIG, "%s: refcount table would "
			    "exceed %u bytes", d->path, MAX_RT_BYTES);
		nb = (ne * 8 + q->cs - 1) & ~(q->cs - 1);
		end = q->next_free + nb + ((nb >> cov) + 3) * q->cs;
		need = (end >> cov) + 1;
		if (ne >= need)
			break;
		ne = need;
	}
	ne = nb / 8;
	if ((nrt = calloc(ne, 8)) == NULL || (buf = malloc(nb)) == NULL) {
		free(nrt);
		return vdsk_error(ENOMEM, "out of memory");
	}
	memcpy(nrt, q->rt, q->rt_entries * 8);
	free(q->rt);
	q->rt = nrt;
	q->rt_entries = ne;
	old_off = q->rt_offset;
	new_off = q->next_free;
	q->next_free += nb;
	q->rt_offset = new_off;
	q->rt_clusters = (uint32_t)(nb >> q->cluster_bits);
	q->growing = 1;
	r = 0;
	for (i = 0; i < nb && r == 0; i += q->cs)
		r = qcow2_set_refcount(d, new_off + i, 1);
	q->growing = 0;
	if (r == 0) {
		for (i = 0; i < ne; i++)
			be64_put(buf + i * 8, q->rt[i]);
		r = vdsk_pwrite(d, buf, nb, new_off, "refcount table");
	}
	free(buf);
	if (r == 0 && fsync(d->fd) < 0)
		r = vdsk_error(errno, "%s: fsync: %s", d->path,
		    strerror(errno));
	if (r < 0)
		return r;
	be64_put(hdr, new_off);
	be32_put(hdr + 8, q->rt_clusters);
	if ((r = vdsk_pwrite(d, hdr, 12, 48, "header")) < 0)
		return r;
	for (i = 0; i < old_clusters && r == 0; i++)
		r = qcow2_set_refcount(d, old_off + (i << q->cluster_bits), 0);
	return r;
}

