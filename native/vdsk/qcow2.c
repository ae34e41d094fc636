/*
 * libvdsk qcow2 driver: versions 2 and 3 read, write with cluster
 * allocation.  Metadata updates are written through (entry by entry) in
 * the order refcount -> data -> L2 -> L1, so the file never references a
 * cluster whose refcount is not yet on disk.  New clusters are appended at
 * the end of the file; freed clusters are not reused yet.
 *
 * Memory is bounded: the L1 and refcount tables are held in memory (their
 * sizes are capped like QEMU's, 32 MiB and 8 MiB), L2 tables and refcount
 * blocks go through small LRU caches.
 *
 * Concurrency: the common layer range-locks whole clusters per request;
 * here every metadata access (L1, L2, refcounts, the caches, next_free) is
 * under vdsk_meta_lock(), data reads and writes are done outside it.
 */
#define _GNU_SOURCE
#include <sys/stat.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vdsk_impl.h"

#define QCOW2_MAGIC             0x514649fbu
#define HDR_V2_LEN              72
#define HDR_V3_LEN              104
#define HDR_CREATE_LEN          112

#define INCOMPAT_DIRTY          (1ULL << 0)
#define INCOMPAT_CORRUPT        (1ULL << 1)
#define INCOMPAT_DATA_FILE      (1ULL << 2)
#define INCOMPAT_COMPRESSION    (1ULL << 3)
#define INCOMPAT_EXTL2          (1ULL << 4)
#define INCOMPAT_KNOWN          0x1fULL

#define EXT_END                 0x00000000u
#define EXT_BACKING_FMT         0xe2792acau
#define EXT_FEATURES            0x6803f857u

#define OFLAG_COPIED            (1ULL << 63)
#define OFLAG_COMPRESSED        (1ULL << 62)
#define OFLAG_ZERO              1ULL
#define L1E_OFFSET_MASK         0x00fffffffffffe00ULL
#define L1E_RESERVED            0x7f000000000001ffULL
#define L2E_OFFSET_MASK         0x00fffffffffffe00ULL
#define L2E_RESERVED            0x3f000000000001feULL
#define RTE_OFFSET_MASK         0xfffffffffffffe00ULL
#define MAX_HOST_OFFSET         (1ULL << 56)

#define MAX_L1_BYTES            (32u << 20)
#define MAX_RT_BYTES            (8u << 20)
#define MAX_SNAPSHOTS           65536
#define MAX_BACKING_NAME        1023
#define DEFAULT_CLUSTER         65536u

#define CACHE_MAX               64

struct tslot {
	uint64_t off;           /* 0: empty (offset 0 is the header) */
	uint64_t lru;
	uint8_t *data;
};

struct tcache {
	const char *what;
	unsigned n;
	uint64_t tick;
	struct tslot s[CACHE_MAX];
};

struct qcow2 {
	uint32_t version;
	uint32_t cluster_bits;
	uint64_t cs;
	uint32_t l2_bits;               /* log2(entries per L2 table) */
	uint32_t refcount_order;
	uint32_t rb_bits;               /* log2(entries per refcount block) */
	uint32_t header_length;
	uint32_t nb_snapshots;
	uint64_t incompat, compat, autoclear;

	uint64_t *l1;
	uint32_t l1_size;
	uint64_t l1_offset;

	uint64_t *rt;                   /* loaded for writable images only */
	uint64_t rt_entries;
	uint64_t rt_offset;
	uint32_t rt_clusters;

	uint64_t next_free;
	int growing;

	struct tcache l2c, rbc;
	uint8_t *cbuf;                  /* one cluster of scratch */
};

enum ckind { C_UNALLOC, C_ZERO, C_NORMAL, C_COMPRESSED };

/* ---- table cache ---- */

static void
cache_init(struct tcache *c, const char *what, uint64_t cs, uint64_t budget)
{
	uint64_t n = budget / cs;

	c->what = what;
	c->n = n < 2 ? 2 : n > CACHE_MAX ? CACHE_MAX : (unsigned)n;
}

static void
cache_free(struct tcache *c)
{
	unsigned i;

	for (i = 0; i < c->n; i++)
		free(c->s[i].data);
	memset(c->s, 0, sizeof(c->s));
}

static void
cache_drop(struct tcache *c, uint64_t off)
{
	unsigned i;

	for (i = 0; i < c->n; i++)
		if (c->s[i].off == off)
			c->s[i].off = 0;
}

/* Get the cluster at 'off' (read it, or zero it if 'fresh'). */
static int
cache_get(struct vdsk *d, struct tcache *c, uint64_t off, int fresh,
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

static int
get_refcount(struct vdsk *d, uint64_t host, uint64_t *val)
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
	if ((r = cache_get(d, &q->rbc, rbo, 0, &b)) < 0)
		return r;
	*val = rb_get(q, b, cl & ((1ULL << q->rb_bits) - 1));
	return 0;
}

static int grow_reftable(struct vdsk *d, uint64_t need_idx);

static int
set_refcount(struct vdsk *d, uint64_t host, uint64_t val)
{
	struct qcow2 *q = d->priv;
	uint64_t cl = host >> q->cluster_bits;
	uint64_t idx = cl >> q->rb_bits, rbo, self;
	size_t boff, blen;
	uint8_t *b;
	int r;

	if (val == 0) {
		cache_drop(&q->l2c, host);
		cache_drop(&q->rbc, host);
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
		/* New refcount block at the end of the file. */
		rbo = q->next_free;
		if (rbo >= MAX_HOST_OFFSET)
			return vdsk_error(EFBIG, "%s: image file too large",
			    d->path);
		q->next_free += q->cs;
		if ((r = cache_get(d, &q->rbc, rbo, 1, &b)) < 0)
			return r;
		if ((r = vdsk_pwrite(d, b, q->cs, rbo, "refcount block")) < 0)
			return r;
		if ((r = rt_set(d, idx, rbo)) < 0)
			return r;
		self = rbo >> q->cluster_bits;
		if ((self >> q->rb_bits) == idx) {
			rb_set(q, b, self & ((1ULL << q->rb_bits) - 1), 1,
			    &boff, &blen);
			r = vdsk_pwrite(d, b + boff, blen, rbo + boff,
			    "refcount");
		} else {
			r = set_refcount(d, rbo, 1);
		}
		if (r < 0)
			return r;
	}
	/* the recursion above may have evicted it: look it up again */
	if ((r = cache_get(d, &q->rbc, rbo, 0, &b)) < 0)
		return r;
	rb_set(q, b, cl & ((1ULL << q->rb_bits) - 1), val, &boff, &blen);
	return vdsk_pwrite(d, b + boff, blen, rbo + boff, "refcount");
}

/* Reserve n contiguous clusters at the end of the file, refcount 1. */
static int
alloc_clusters(struct vdsk *d, uint64_t n, uint64_t *off)
{
	struct qcow2 *q = d->priv;
	uint64_t i;
	int r;

	*off = 0;
	if (q->next_free >= MAX_HOST_OFFSET ||
	    n > (MAX_HOST_OFFSET - q->next_free) >> q->cluster_bits)
		return vdsk_error(EFBIG, "%s: image file too large", d->path);
	*off = q->next_free;
	q->next_free += n << q->cluster_bits;
	for (i = 0; i < n; i++)
		if ((r = set_refcount(d, *off + (i << q->cluster_bits), 1)) < 0)
			return r;
	return 0;
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
		r = set_refcount(d, new_off + i, 1);
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
		r = set_refcount(d, old_off + (i << q->cluster_bits), 0);
	return r;
}

/* ---- mapping ---- */

static int
corrupt(struct vdsk *d, const char *what, uint64_t idx, uint64_t val)
{
	return vdsk_error(EIO, "%s: corrupt image: %s %llu (%#llx)", d->path,
	    what, (unsigned long long)idx, (unsigned long long)val);
}

static int
l2_offset(struct vdsk *d, uint64_t l1i, uint64_t *l2o)
{
	struct qcow2 *q = d->priv;
	uint64_t e;

	*l2o = 0;
	if (l1i >= q->l1_size)
		return 0;
	e = q->l1[l1i];
	*l2o = e & L1E_OFFSET_MASK;
	if ((e & L1E_RESERVED) || (*l2o & (q->cs - 1)) ||
	    (*l2o == 0 && e != 0))
		return corrupt(d, "L1 entry", l1i, e);
	return 0;
}

/* Map guest offset to its L2 entry (0 if no L2 table). */
static int
l2_entry(struct vdsk *d, uint64_t off, uint64_t *entry)
{
	struct qcow2 *q = d->priv;
	uint64_t cl = off >> q->cluster_bits, l2o;
	uint8_t *t;
	int r;

	*entry = 0;
	if ((r = l2_offset(d, cl >> q->l2_bits, &l2o)) < 0 || l2o == 0)
		return r;
	if ((r = cache_get(d, &q->l2c, l2o, 0, &t)) < 0)
		return r;
	*entry = be64_get(t + (cl & ((1ULL << q->l2_bits) - 1)) * 8);
	return 0;
}

static int
classify(struct vdsk *d, uint64_t off, uint64_t e, enum ckind *k,
    uint64_t *host)
{
	struct qcow2 *q = d->priv;
	uint64_t cl = off >> q->cluster_bits;

	*host = e & L2E_OFFSET_MASK;
	if (e & OFLAG_COMPRESSED) {
		*k = C_COMPRESSED;
		*host = 0;
		return 0;
	}
	if ((e & L2E_RESERVED) || (*host & (q->cs - 1)) ||
	    ((e & OFLAG_ZERO) && q->version < 3) ||
	    (*host == 0 && (e & OFLAG_COPIED)))
		return corrupt(d, "L2 entry for guest cluster", cl, e);
	if (e & OFLAG_ZERO)
		*k = C_ZERO;
	else
		*k = *host ? C_NORMAL : C_UNALLOC;
	return 0;
}

static int
lookup(struct vdsk *d, uint64_t off, enum ckind *k, uint64_t *host)
{
	uint64_t e;
	int r;

	if ((r = l2_entry(d, off, &e)) < 0)
		return r;
	return classify(d, off, e, k, host);
}

/* Map the run at off: kind, host offset, length (metadata lock held). */
static int
map_run(struct vdsk *d, uint64_t off, size_t len, enum ckind *k,
    uint64_t *host, size_t *np)
{
	struct qcow2 *q = d->priv;
	uint64_t host2, inoff = off & (q->cs - 1);
	enum ckind k2;
	size_t n, step;
	int r;

	if ((r = lookup(d, off, k, host)) < 0)
		return r;
	n = q->cs - inoff < len ? (size_t)(q->cs - inoff) : len;
	/* extend the run over clusters that can share one I/O */
	while (n < len && *k != C_COMPRESSED) {
		if ((r = lookup(d, off + n, &k2, &host2)) < 0)
			return r;
		if (k2 != *k || (*k == C_NORMAL &&
		    host2 != *host + inoff + n))
			break;
		step = len - n < q->cs ? len - n : (size_t)q->cs;
		n += step;
	}
	*np = n;
	return 0;
}

static int
qcow2_read(struct vdsk *d, void *buf, uint64_t off, size_t len)
{
	struct qcow2 *q = d->priv;
	uint8_t *p = buf;
	enum ckind k;
	uint64_t host, inoff;
	size_t n;
	int r;

	while (len > 0) {
		inoff = off & (q->cs - 1);
		vdsk_meta_lock(d);
		r = map_run(d, off, len, &k, &host, &n);
		vdsk_meta_unlock(d);
		if (r < 0)
			return r;
		switch (k) {
		case C_UNALLOC:
			r = vdsk_read_backing(d, p, off, n);
			break;
		case C_ZERO:
			memset(p, 0, n);
			r = 0;
			break;
		case C_NORMAL:
			r = vdsk_pread(d, p, n, host + inoff, "data cluster");
			break;
		case C_COMPRESSED:
		default:
			r = vdsk_error(ENOTSUP, "%s: compressed clusters are "
			    "not supported yet (guest offset %#llx)", d->path,
			    (unsigned long long)off);
			break;
		}
		if (r < 0)
			return r;
		p += n;
		off += n;
		len -= n;
	}
	return 0;
}

/* A cluster we may overwrite in place must not overlap the metadata. */
static int
check_data_host(struct vdsk *d, uint64_t host)
{
	struct qcow2 *q = d->priv;
	uint64_t l1e = q->l1_offset + (uint64_t)q->l1_size * 8;
	uint64_t rte = q->rt_offset + q->rt_entries * 8;

	if (host < q->cs || (host + q->cs > q->l1_offset && host < l1e) ||
	    (host + q->cs > q->rt_offset && host < rte))
		return vdsk_error(EIO, "%s: corrupt image: data cluster %#llx "
		    "overlaps metadata", d->path, (unsigned long long)host);
	return 0;
}

/* Make sure the L1 entry points to a writable (refcount 1) L2 table. */
static int
l2_for_write(struct vdsk *d, uint64_t l1i, uint64_t *l2o)
{
	struct qcow2 *q = d->priv;
	uint64_t rc, nl2;
	uint8_t e[8], *t;
	int r;

	if ((r = l2_offset(d, l1i, l2o)) < 0)
		return r;
	if (*l2o != 0) {
		if (q->l1[l1i] & OFLAG_COPIED)
			return 0;
		if ((r = get_refcount(d, *l2o, &rc)) < 0)
			return r;
		if (rc != 1)
			return vdsk_error(ENOTSUP, "%s: L2 table %#llx is "
			    "shared (refcount %llu); copy-on-write of "
			    "tables is not supported", d->path,
			    (unsigned long long)*l2o,
			    (unsigned long long)rc);
		nl2 = *l2o;
	} else {
		if ((r = alloc_clusters(d, 1, &nl2)) < 0)
			return r;
		if ((r = cache_get(d, &q->l2c, nl2, 1, &t)) < 0)
			return r;
		if ((r = vdsk_pwrite(d, t, q->cs, nl2, "L2 table")) < 0)
			return r;
	}
	q->l1[l1i] = nl2 | OFLAG_COPIED;
	be64_put(e, q->l1[l1i]);
	*l2o = nl2;
	return vdsk_pwrite(d, e, 8, q->l1_offset + l1i * 8, "L1 entry");
}

/*
 * Write within one guest cluster.  The caller holds the range lock on the
 * whole cluster, so its L2 entry is ours; the metadata lock is held only
 * around metadata work, not around data I/O.
 */
static int
write_cluster(struct vdsk *d, uint64_t off, const uint8_t *data, size_t n)
{
	struct qcow2 *q = d->priv;
	uint64_t cl = off >> q->cluster_bits, gco = cl << q->cluster_bits;
	uint64_t inoff = off - gco, l2o, e, host, nh, l2i;
	uint8_t *t, eb[8], *cbuf = NULL;
	const uint8_t *src = data;
	enum ckind k;
	int r;

	vdsk_meta_lock(d);
	if ((r = l2_for_write(d, cl >> q->l2_bits, &l2o)) < 0)
		goto out;
	if ((r = cache_get(d, &q->l2c, l2o, 0, &t)) < 0)
		goto out;
	l2i = cl & ((1ULL << q->l2_bits) - 1);
	e = be64_get(t + l2i * 8);
	if ((r = classify(d, off, e, &k, &host)) < 0)
		goto out;
	if (k == C_COMPRESSED) {
		r = vdsk_error(ENOTSUP, "%s: writing to compressed "
		    "clusters is not supported yet (guest offset %#llx)",
		    d->path, (unsigned long long)off);
		goto out;
	}
	if (k == C_NORMAL && (e & OFLAG_COPIED)) {
		r = check_data_host(d, host);
		vdsk_meta_unlock(d);
		return r < 0 ? r : vdsk_pwrite(d, data, n, host + inoff, "data");
	}
	vdsk_meta_unlock(d);
	/* Build the whole new cluster: old contents + new data. */
	if (n < q->cs) {
		if ((cbuf = malloc(q->cs)) == NULL)
			return vdsk_error(ENOMEM, "out of memory");
		if (k == C_ZERO)
			memset(cbuf, 0, q->cs);
		else if (k == C_NORMAL)
			r = vdsk_pread(d, cbuf, q->cs, host, "data cluster");
		else
			r = vdsk_read_backing(d, cbuf, gco, q->cs);
		if (r < 0)
			goto out_free;
		memcpy(cbuf + inoff, data, n);
		src = cbuf;
	}
	vdsk_meta_lock(d);
	if (k == C_ZERO && host != 0 && (e & OFLAG_COPIED)) {
		/* preallocated zero cluster: reuse it */
		if ((r = check_data_host(d, host)) < 0)
			goto out;
		nh = host;
		host = 0;
	} else if ((r = alloc_clusters(d, 1, &nh)) < 0) {
		goto out;
	}
	vdsk_meta_unlock(d);
	if ((r = vdsk_pwrite(d, src, q->cs, nh, "data cluster")) < 0)
		goto out_free;
	vdsk_meta_lock(d);
	/* others may have evicted the table from the cache */
	if ((r = cache_get(d, &q->l2c, l2o, 0, &t)) < 0)
		goto out;
	be64_put(eb, nh | OFLAG_COPIED);
	memcpy(t + l2i * 8, eb, 8);
	if ((r = vdsk_pwrite(d, eb, 8, l2o + l2i * 8, "L2 entry")) < 0)
		goto out;
	if (host != 0) {
		uint64_t rc;

		if ((r = get_refcount(d, host, &rc)) < 0)
			goto out;
		if (rc > 0)
			r = set_refcount(d, host, rc - 1);
	}
out:
	vdsk_meta_unlock(d);
out_free:
	free(cbuf);
	return r;
}

static int
qcow2_write(struct vdsk *d, const void *buf, uint64_t off, size_t len)
{
	struct qcow2 *q = d->priv;
	const uint8_t *p = buf;
	size_t n;
	int r;

	while (len > 0) {
		n = q->cs - (off & (q->cs - 1));
		if (n > len)
			n = len;
		if ((r = write_cluster(d, off, p, n)) < 0)
			return r;
		p += n;
		off += n;
		len -= n;
	}
	return 0;
}

static int
qcow2_flush(struct vdsk *d)
{
	if (fsync(d->fd) < 0)
		return vdsk_error(errno, "%s: fsync: %s", d->path,
		    strerror(errno));
	return 0;
}

/* Entries needed in the L1 table for a virtual size. */
static uint64_t
l1_entries_for(const struct qcow2 *q, uint64_t size)
{
	uint32_t sh = q->cluster_bits + q->l2_bits;

	return (size >> sh) + ((size & ((1ULL << sh) - 1)) != 0);
}

/* Grow the virtual size, moving the L1 table if it must grow. */
static int
qcow2_grow(struct vdsk *d, uint64_t size)
{
	struct qcow2 *q = d->priv;
	uint64_t need = l1_entries_for(q, size), nc, off, i, *nl1;
	uint64_t old_off = q->l1_offset, old_nc;
	uint8_t hdr[24], *buf;
	int r;

	if (need > MAX_L1_BYTES / 8)
		return vdsk_error(EFBIG, "%s: virtual size %llu needs an L1 "
		    "table larger than %u bytes", d->path,
		    (unsigned long long)size, MAX_L1_BYTES);
	be64_put(hdr, size);
	be32_put(hdr + 8, 0);
	if (need <= q->l1_size) {
		d->size = size;
		return vdsk_pwrite(d, hdr, 8, 24, "header");
	}
	nc = (need * 8 + q->cs - 1) >> q->cluster_bits;
	if ((nl1 = calloc(need, 8)) == NULL ||
	    (buf = calloc(nc, q->cs)) == NULL) {
		free(nl1);
		return vdsk_error(ENOMEM, "out of memory");
	}
	if (q->l1_size)
		memcpy(nl1, q->l1, (size_t)q->l1_size * 8);
	for (i = 0; i < need; i++)
		be64_put(buf + i * 8, nl1[i]);
	r = alloc_clusters(d, nc, &off);
	if (r == 0)
		r = vdsk_pwrite(d, buf, nc * q->cs, off, "L1 table");
	free(buf);
	if (r == 0 && fsync(d->fd) < 0)
		r = vdsk_error(errno, "%s: fsync: %s", d->path,
		    strerror(errno));
	if (r < 0) {
		free(nl1);
		return r;
	}
	be32_put(hdr + 12, (uint32_t)need);
	be64_put(hdr + 16, off);
	if ((r = vdsk_pwrite(d, hdr, 24, 24, "header")) < 0) {
		free(nl1);
		return r;
	}
	old_nc = ((uint64_t)q->l1_size * 8 + q->cs - 1) >> q->cluster_bits;
	free(q->l1);
	q->l1 = nl1;
	q->l1_size = (uint32_t)need;
	q->l1_offset = off;
	d->size = size;
	for (i = 0; i < old_nc && r == 0; i++)
		r = set_refcount(d, old_off + (i << q->cluster_bits), 0);
	return r;
}

/* ---- open ---- */

static const char *
feature_name(const uint8_t *tab, uint32_t len, int type, int bit,
    char *out, size_t outlen)
{
	uint32_t i;

	for (i = 0; i + 48 <= len; i += 48) {
		if (tab[i] == type && tab[i + 1] == bit) {
			snprintf(out, outlen, "%.46s", (const char *)tab + i + 2);
			return out;
		}
	}
	return "unknown";
}

static int
parse_extensions(struct vdsk *d, const uint8_t *hc, uint32_t start,
    uint32_t end, uint64_t unknown_incompat)
{
	const uint8_t *feat = NULL;
	uint32_t feat_len = 0, off = start;
	char msg[256], name[48];
	size_t m = 0;
	int bit;

	while (off + 8 <= end) {
		uint32_t type = be32_get(hc + off), len = be32_get(hc + off + 4);

		if (type == EXT_END)
			break;
		if (len > end - off - 8)
			return vdsk_error(EINVAL, "%s: header extension %#x at "
			    "%u overflows the header area", d->path, type, off);
		if (type == EXT_BACKING_FMT) {
			if (len == 0 || len >= VDSK_FMT_MAX ||
			    memchr(hc + off + 8, 0, len) != NULL)
				return vdsk_error(EINVAL, "%s: invalid backing "
				    "format extension", d->path);
			memcpy(d->backing_fmt, hc + off + 8, len);
			d->backing_fmt[len] = '\0';
		} else if (type == EXT_FEATURES) {
			feat = hc + off + 8;
			feat_len = len;
		}
		off += 8 + ((len + 7) & ~7u);
	}
	if (unknown_incompat == 0)
		return 0;
	m = (size_t)snprintf(msg, sizeof(msg), "unsupported incompatible "
	    "feature(s):");
	for (bit = 0; bit < 64 && m < sizeof(msg); bit++)
		if (unknown_incompat & (1ULL << bit))
			m += (size_t)snprintf(msg + m, sizeof(msg) - m,
			    " bit %d (%s)", bit, feature_name(feat, feat_len,
			    0, bit, name, sizeof(name)));
	return vdsk_error(ENOTSUP, "%s: %s", d->path, msg);
}

static int
load_table(struct vdsk *d, uint64_t off, uint64_t n, uint64_t **out,
    const char *what)
{
	uint64_t *t, i;
	int r;

	*out = NULL;
	if (n == 0)
		return 0;
	if ((t = malloc(n * 8)) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	if ((r = vdsk_pread(d, t, n * 8, off, what)) < 0) {
		free(t);
		return r;
	}
	for (i = 0; i < n; i++)
		t[i] = be64_get((const uint8_t *)&t[i]);
	*out = t;
	return 0;
}

static int
open_header(struct vdsk *d, struct qcow2 *q, uint8_t *hc)
{
	uint64_t bfo, l1need, snap_off, unknown;
	uint32_t bfs, crypt, ext_end;
	uint32_t ctype = 0;
	int rw = !(d->flags & VDSK_RDONLY);

	q->incompat = q->version >= 3 ? be64_get(hc + 72) : 0;
	q->compat = q->version >= 3 ? be64_get(hc + 80) : 0;
	q->autoclear = q->version >= 3 ? be64_get(hc + 88) : 0;
	q->refcount_order = q->version >= 3 ? be32_get(hc + 96) : 4;
	if (q->refcount_order > 6)
		return vdsk_error(EINVAL, "%s: invalid refcount order %u",
		    d->path, q->refcount_order);
	q->rb_bits = q->cluster_bits + 3 - q->refcount_order;
	crypt = be32_get(hc + 32);
	if (crypt != 0)
		return vdsk_error(ENOTSUP, "%s: encrypted qcow2 images "
		    "(method %u) are not supported", d->path, crypt);

	bfo = be64_get(hc + 8);
	bfs = be32_get(hc + 16);
	ext_end = (uint32_t)q->cs;
	if (bfo != 0) {
		if (bfs == 0 || bfs > MAX_BACKING_NAME || bfo < q->header_length
		    || bfo > q->cs - bfs)
			return vdsk_error(EINVAL, "%s: invalid backing file "
			    "name location (offset %llu, length %u)", d->path,
			    (unsigned long long)bfo, bfs);
		if (memchr(hc + bfo, 0, bfs) != NULL)
			return vdsk_error(EINVAL, "%s: backing file name "
			    "contains a NUL byte", d->path);
		memcpy(d->backing_file, hc + bfo, bfs);
		d->backing_file[bfs] = '\0';
		ext_end = (uint32_t)bfo;
	}

	unknown = q->incompat & ~INCOMPAT_KNOWN;
	{
		int r = parse_extensions(d, hc, q->header_length, ext_end,
		    unknown);
		if (r < 0)
			return r;
	}
	if (q->incompat & INCOMPAT_DATA_FILE)
		return vdsk_error(ENOTSUP, "%s: qcow2 external data files are "
		    "not supported", d->path);
	if (q->incompat & INCOMPAT_EXTL2)
		return vdsk_error(ENOTSUP, "%s: qcow2 extended L2 entries "
		    "(subclusters) are not supported", d->path);
	if (q->header_length > 104)
		ctype = hc[104];
	if ((q->incompat & INCOMPAT_COMPRESSION) ? ctype != 1 : ctype != 0)
		return vdsk_error(EINVAL, "%s: invalid compression type %u",
		    d->path, ctype);
	if (rw && (q->incompat & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT)))
		return vdsk_error(EROFS, "%s: image is marked %s; open it "
		    "read-only or repair it (qemu-img check -r all)", d->path,
		    (q->incompat & INCOMPAT_CORRUPT) ? "corrupt" : "dirty");

	d->size = be64_get(hc + 24);
	if (d->size > (uint64_t)INT64_MAX)
		return vdsk_error(EFBIG, "%s: virtual size too large", d->path);
	q->l1_size = be32_get(hc + 36);
	q->l1_offset = be64_get(hc + 40);
	if ((uint64_t)q->l1_size > MAX_L1_BYTES / 8)
		return vdsk_error(EFBIG, "%s: L1 table too large (%u entries)",
		    d->path, q->l1_size);
	l1need = l1_entries_for(q, d->size);
	if (l1need > q->l1_size)
		return vdsk_error(EINVAL, "%s: L1 table too small (%u entries) "
		    "for the virtual size", d->path, q->l1_size);
	if (q->l1_size > 0 && (q->l1_offset == 0 ||
	    (q->l1_offset & (q->cs - 1)) || q->l1_offset >= MAX_HOST_OFFSET))
		return vdsk_error(EINVAL, "%s: invalid L1 table offset %#llx",
		    d->path, (unsigned long long)q->l1_offset);

	q->rt_offset = be64_get(hc + 48);
	q->rt_clusters = be32_get(hc + 56);
	if ((uint64_t)q->rt_clusters << q->cluster_bits > MAX_RT_BYTES)
		return vdsk_error(EFBIG, "%s: refcount table too large (%u "
		    "clusters)", d->path, q->rt_clusters);
	if (q->rt_clusters == 0 || q->rt_offset == 0 ||
	    (q->rt_offset & (q->cs - 1)) || q->rt_offset >= MAX_HOST_OFFSET)
		return vdsk_error(EINVAL, "%s: invalid refcount table (offset "
		    "%#llx, %u clusters)", d->path,
		    (unsigned long long)q->rt_offset, q->rt_clusters);

	q->nb_snapshots = be32_get(hc + 60);
	snap_off = be64_get(hc + 64);
	if (q->nb_snapshots > MAX_SNAPSHOTS || (q->nb_snapshots &&
	    (snap_off == 0 || (snap_off & (q->cs - 1)))))
		return vdsk_error(EINVAL, "%s: invalid snapshot table (%u "
		    "snapshots at %#llx)", d->path, q->nb_snapshots,
		    (unsigned long long)snap_off);
	if (rw && q->nb_snapshots)
		return vdsk_error(ENOTSUP, "%s: writing to images with "
		    "internal snapshots is not supported yet", d->path);
	return 0;
}

static int
qcow2_open(struct vdsk *d)
{
	struct qcow2 *q;
	uint8_t h[HDR_V3_LEN], *hc;
	size_t n;
	int r;

	if (d->file_size < HDR_V2_LEN)
		return vdsk_error(EINVAL, "%s: file too small for a qcow2 "
		    "header", d->path);
	n = d->file_size < sizeof(h) ? (size_t)d->file_size : sizeof(h);
	memset(h, 0, sizeof(h));
	if ((r = vdsk_pread(d, h, n, 0, "header")) < 0)
		return r;
	if (be32_get(h) != QCOW2_MAGIC)
		return vdsk_error(EINVAL, "%s: not a qcow2 image (bad magic)",
		    d->path);
	if ((q = calloc(1, sizeof(*q))) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	d->priv = q;
	q->version = be32_get(h + 4);
	if (q->version != 2 && q->version != 3)
		return vdsk_error(ENOTSUP, "%s: unsupported qcow2 version %u",
		    d->path, q->version);
	q->cluster_bits = be32_get(h + 20);
	if (q->cluster_bits < 9 || q->cluster_bits > 21)
		return vdsk_error(EINVAL, "%s: invalid cluster bits %u "
		    "(512 bytes .. 2 MiB supported)", d->path,
		    q->cluster_bits);
	q->cs = 1ULL << q->cluster_bits;
	q->l2_bits = q->cluster_bits - 3;
	if (q->version == 2) {
		q->header_length = HDR_V2_LEN;
	} else {
		if (n < HDR_V3_LEN)
			return vdsk_error(EINVAL, "%s: file too small for a "
			    "qcow2 v3 header", d->path);
		q->header_length = be32_get(h + 100);
		if (q->header_length < HDR_V3_LEN ||
		    (q->header_length & 7) || q->header_length > q->cs ||
		    q->header_length > d->file_size)
			return vdsk_error(EINVAL, "%s: invalid header length "
			    "%u", d->path, q->header_length);
	}
	/* The whole first cluster: header, extensions, backing name. */
	if ((hc = calloc(1, q->cs)) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	n = d->file_size < q->cs ? (size_t)d->file_size : (size_t)q->cs;
	r = vdsk_pread(d, hc, n, 0, "header cluster");
	if (r == 0)
		r = open_header(d, q, hc);
	free(hc);
	if (r < 0)
		return r;
	if ((r = load_table(d, q->l1_offset, q->l1_size, &q->l1,
	    "L1 table")) < 0)
		return r;
	cache_init(&q->l2c, "L2 table", q->cs,
	    d->l2_cache_bytes ? d->l2_cache_bytes : 4u << 20);
	cache_init(&q->rbc, "refcount block", q->cs, 1u << 20);
	if (d->flags & VDSK_RDONLY)
		return 0;

	if ((q->cbuf = malloc(q->cs)) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	q->rt_entries = ((uint64_t)q->rt_clusters << q->cluster_bits) / 8;
	if ((r = load_table(d, q->rt_offset, q->rt_entries, &q->rt,
	    "refcount table")) < 0)
		return r;
	q->next_free = (d->file_size + q->cs - 1) & ~(q->cs - 1);
	if (q->autoclear != 0) {
		/* we keep none of the auto-clear features consistent */
		uint8_t z[8] = { 0 };

		if ((r = vdsk_pwrite(d, z, 8, 88, "header")) < 0)
			return r;
		q->autoclear = 0;
	}
	return 0;
}

static void
qcow2_close(struct vdsk *d)
{
	struct qcow2 *q = d->priv;

	cache_free(&q->l2c);
	cache_free(&q->rbc);
	free(q->l1);
	free(q->rt);
	free(q->cbuf);
	free(q);
	d->priv = NULL;
}

static void
qcow2_info(struct vdsk *d, struct vdsk_info *info)
{
	struct qcow2 *q = d->priv;

	info->cluster_size = (uint32_t)q->cs;
	info->version = q->version;
	info->dirty = (q->incompat & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT)) != 0;
}

/* ---- create ---- */

/* Refuse a backing chain that contains the file we are about to create. */
static int
check_not_in_chain(const char *path, const struct vdsk *b)
{
	struct stat st;

	if (stat(path, &st) < 0)
		return 0;
	for (; b != NULL; b = b->backing)
		if (b->dev == st.st_dev && b->ino == st.st_ino)
			return vdsk_error(ELOOP, "%s: image would be part of "
			    "its own backing chain", path);
	return 0;
}

static int
probe_backing(const char *path, const char *backing, const char **bfmt,
    uint64_t *size)
{
	struct vdsk *b;
	char *bpath;
	int r;

	if ((bpath = vdsk_backing_path(path, backing)) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	b = vdsk_open_internal(bpath, *bfmt, VDSK_RDONLY, 1, NULL);
	free(bpath);
	if (b == NULL) {
		char msg[512];
		int err = vdsk_errno();

		snprintf(msg, sizeof(msg), "%s", vdsk_errmsg());
		return vdsk_error(err, "%s: cannot open backing file: %s",
		    path, msg);
	}
	r = check_not_in_chain(path, b);
	if (*bfmt == NULL)
		*bfmt = b->ops->name;   /* static string */
	if (*size == 0)
		*size = b->size;
	vdsk_close(b);
	return r;
}

static int
qcow2_create(const char *path, uint64_t size, const char *backing,
    const char *backing_fmt, uint32_t cluster_size)
{
	uint32_t cs = cluster_size ? cluster_size : DEFAULT_CLUSTER, cb = 9;
	uint32_t off, blen = 0, flen;
	uint8_t *buf;
	struct vdsk *d;
	int fd, r;

	if (cs < 512 || cs > (2u << 20) || (cs & (cs - 1)))
		return vdsk_error(EINVAL, "%s: cluster size must be a power "
		    "of two between 512 and 2M", path);
	while ((1u << cb) < cs)
		cb++;
	if (backing != NULL) {
		blen = (uint32_t)strlen(backing);
		if (blen > MAX_BACKING_NAME)
			return vdsk_error(ENAMETOOLONG, "%s: backing file name "
			    "too long", path);
		if ((r = probe_backing(path, backing, &backing_fmt,
		    &size)) < 0)
			return r;
	}
	if ((buf = calloc(3, cs)) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	be32_put(buf, QCOW2_MAGIC);
	be32_put(buf + 4, 3);
	be32_put(buf + 20, cb);
	be64_put(buf + 48, cs);                 /* refcount table */
	be32_put(buf + 56, 1);
	be32_put(buf + 96, 4);                  /* refcount order */
	be32_put(buf + 100, HDR_CREATE_LEN);
	off = HDR_CREATE_LEN;
	if (backing != NULL) {
		flen = (uint32_t)strlen(backing_fmt);
		be32_put(buf + off, EXT_BACKING_FMT);
		be32_put(buf + off + 4, flen);
		memcpy(buf + off + 8, backing_fmt, flen);
		off += 8 + ((flen + 7) & ~7u);
	}
	off += 8;                               /* end of extensions */
	if (backing != NULL) {
		if (off + blen > cs) {
			free(buf);
			return vdsk_error(ENAMETOOLONG, "%s: backing file name "
			    "does not fit in a %u byte cluster", path, cs);
		}
		be64_put(buf + 8, off);
		be32_put(buf + 16, blen);
		memcpy(buf + off, backing, blen);
	}
	be64_put(buf + cs, 2ULL * cs);          /* refcount block 0 */
	be16_put(buf + 2 * cs, 1);              /* clusters 0, 1, 2 */
	be16_put(buf + 2 * cs + 2, 1);
	be16_put(buf + 2 * cs + 4, 1);

	fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) {
		free(buf);
		return vdsk_error(errno, "%s: %s", path, strerror(errno));
	}
	r = 0;
	{
		size_t done = 0, total = 3 * (size_t)cs;

		while (done < total) {
			ssize_t w = pwrite(fd, buf + done, total - done,
			    (off_t)done);
			if (w < 0 && errno == EINTR)
				continue;
			if (w < 0) {
				r = vdsk_error(errno, "%s: %s", path,
				    strerror(errno));
				break;
			}
			done += (size_t)w;
		}
	}
	free(buf);
	close(fd);
	if (r == 0) {
		d = vdsk_open_internal(path, "qcow2", VDSK_NO_BACKING, 0,
		    NULL);
		if (d == NULL)
			r = -vdsk_errno();
		else {
			r = qcow2_grow(d, size);
			if (r == 0)
				r = qcow2_flush(d);
			if (r < 0)
				vdsk_close(d);
			else
				r = vdsk_close(d);
		}
	}
	if (r < 0)
		unlink(path);
	return r;
}

/* Allocation status from the L2 tables (see vdsk_ops.block_status). */
static int
qcow2_block_status(struct vdsk *d, uint64_t off, uint64_t len,
    uint64_t *pnum)
{
	static const int bs[] = { [C_UNALLOC] = VDSK_BS_UNALLOCATED,
	    [C_ZERO] = VDSK_BS_ZERO, [C_NORMAL] = VDSK_BS_DATA,
	    [C_COMPRESSED] = VDSK_BS_DATA };
	struct qcow2 *q = d->priv;
	uint64_t pos = off, end = off + len, l2span, l2o, host, next;
	enum ckind k, k0 = C_UNALLOC;
	int r = 0;

	l2span = 1ULL << (q->cluster_bits + q->l2_bits);
	vdsk_meta_lock(d);
	while (pos < end) {
		if ((r = l2_offset(d, pos / l2span, &l2o)) < 0)
			break;
		if (l2o == 0) {
			k = C_UNALLOC;
			next = (pos / l2span + 1) * l2span;
		} else {
			if ((r = lookup(d, pos, &k, &host)) < 0)
				break;
			next = ((pos >> q->cluster_bits) + 1) << q->cluster_bits;
		}
		if (pos == off)
			k0 = k;
		else if (bs[k] != bs[k0])
			break;
		pos = next;
	}
	vdsk_meta_unlock(d);
	if (r < 0)
		return r;
	*pnum = (pos < end ? pos : end) - off;
	return bs[k0];
}

const struct vdsk_ops vdsk_qcow2_ops = {
	.name = "qcow2",
	.open = qcow2_open,
	.close = qcow2_close,
	.read = qcow2_read,
	.write = qcow2_write,
	.flush = qcow2_flush,
	.create = qcow2_create,
	.info = qcow2_info,
	.block_status = qcow2_block_status,
	.set_backing = vdsk_qcow2_set_backing,
	.threadsafe = 1,
};
