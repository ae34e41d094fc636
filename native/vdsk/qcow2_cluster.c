/*
 * libvdsk qcow2: guest to host cluster mapping, reads (normal, zero,
 * compressed and subcluster entries), copy-on-write writes, discard,
 * compressed cluster writes, virtual size changes.
 *
 * OFLAG_COPIED is kept as qemu does: set on an L1/L2 entry exactly when
 * the cluster it points to has refcount 1.  A cluster without it is
 * shared (with an internal snapshot) and is copied before it is written.
 *
 * Locking (see qcow2.c): static helpers here run with the metadata lock
 * held unless they say otherwise; the exported entry points take it
 * around metadata work and drop it for data I/O and (de)compression.
 */
#define _GNU_SOURCE
#include <sys/stat.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>
#include <zstd.h>

#include "qcow2.h"

int
qcow2_corrupt(struct vdsk *d, const char *what, uint64_t idx, uint64_t val)
{
	return vdsk_error(EIO, "%s: corrupt image: %s %llu (%#llx)", d->path,
	    what, (unsigned long long)idx, (unsigned long long)val);
}
#define corrupt qcow2_corrupt

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

/* Map guest offset to its L2 entry and subcluster bitmap (0 if none). */
static int
l2_entry(struct vdsk *d, uint64_t off, uint64_t *entry, uint64_t *bitmap)
{
	struct qcow2 *q = d->priv;
	uint64_t cl = off >> q->cluster_bits, l2o;
	uint8_t *t, *p;
	int r;

	*entry = 0;
	*bitmap = 0;
	if ((r = l2_offset(d, cl >> q->l2_bits, &l2o)) < 0 || l2o == 0)
		return r;
	if ((r = qcow2_cache_get(d, &q->l2c, l2o, 0, &t)) < 0)
		return r;
	p = t + (cl & ((1ULL << q->l2_bits) - 1)) * q->l2e_size;
	*entry = be64_get(p);
	if (q->extl2)
		*bitmap = be64_get(p + 8);
	return 0;
}

void
qcow2_entry_range(const struct qcow2 *q, uint64_t e, uint64_t *off,
    uint64_t *len)
{
	if (e & OFLAG_COMPRESSED) {
		uint64_t c = e & q->coff_mask;
		uint64_t nb = ((e >> q->csize_shift) & q->csize_mask) + 1;

		*off = c & ~511ULL;
		*len = nb * 512;
	} else {
		*off = e & L2E_OFFSET_MASK;
		*len = *off ? q->cs : 0;
	}
}

/* Kind of a (non-extended view of an) L2 entry, with validation. */
int
qcow2_entry_kind(struct vdsk *d, uint64_t e, enum ckind *k)
{
	struct qcow2 *q = d->priv;
	uint64_t host = e & L2E_OFFSET_MASK;

	if (e & OFLAG_COMPRESSED) {
		*k = C_COMPRESSED;
		if ((e & q->coff_mask) == 0 || (e & OFLAG_COPIED))
			return -EIO;
		return 0;
	}
	if ((e & L2E_RESERVED) || (host & (q->cs - 1)) ||
	    ((e & OFLAG_ZERO) && (q->version < 3 || q->extl2)) ||
	    (host == 0 && (e & OFLAG_COPIED)))
		return -EIO;
	if (e & OFLAG_ZERO)
		*k = C_ZERO;
	else
		*k = host ? C_NORMAL : C_UNALLOC;
	return 0;
}

static int
classify(struct vdsk *d, uint64_t off, uint64_t e, enum ckind *k,
    uint64_t *host)
{
	struct qcow2 *q = d->priv;

	if (qcow2_entry_kind(d, e, k) < 0)
		return corrupt(d, "L2 entry for guest cluster",
		    off >> q->cluster_bits, e);
	*host = *k == C_COMPRESSED ? 0 : e & L2E_OFFSET_MASK;
	return 0;
}

/*
 * What backs guest bytes [off, off+*n): kind, host offset of 'off' (for
 * C_NORMAL) or the L2 entry (C_COMPRESSED).  *n is at most len and stays
 * within one cluster (one subcluster run with extended L2).
 */
static int
map(struct vdsk *d, uint64_t off, size_t len, enum ckind *k, uint64_t *host,
    size_t *n)
{
	struct qcow2 *q = d->priv;
	uint64_t e, bm, inoff = off & (q->cs - 1), chost = 0;
	uint32_t scb, sc, s;
	size_t avail = q->cs - inoff < len ? (size_t)(q->cs - inoff) : len;
	int r;

	if ((r = l2_entry(d, off, &e, &bm)) < 0)
		return r;
	if ((r = classify(d, off, e, k, &chost)) < 0)
		return r;
	*n = avail;
	if (*k == C_COMPRESSED) {
		*host = e;
		return 0;
	}
	if (!q->extl2) {
		*host = chost + inoff;
		return 0;
	}
	/* 32 subclusters: bitmap bits 0-31 allocated, 32-63 reads as zero */
	if ((uint32_t)bm & (uint32_t)(bm >> 32))
		return corrupt(d, "subcluster bitmap for guest cluster",
		    off >> q->cluster_bits, bm);
	if (chost == 0 && (uint32_t)bm != 0)
		return corrupt(d, "subcluster bitmap for guest cluster",
		    off >> q->cluster_bits, bm);
	scb = q->cluster_bits - 5;
	sc = (uint32_t)(inoff >> scb);
#define SCKIND(i) ((bm >> (i)) & 1 ? C_NORMAL : (bm >> (32 + (i))) & 1 ? \
	C_ZERO : C_UNALLOC)
	*k = SCKIND(sc);
	for (s = sc + 1; s < 32 && SCKIND(s) == *k; s++)
		;
#undef SCKIND
	if (((uint64_t)s << scb) - inoff < *n)
		*n = (size_t)(((uint64_t)s << scb) - inoff);
	*host = chost + inoff;
	return 0;
}

static int inflate_cluster(struct vdsk *d, const uint8_t *zbuf, size_t got,
    uint8_t *dbuf, uint64_t guest);

/*
 * Decompress the cluster an L2 entry describes into out (one cluster).
 * Called without the metadata lock (the caller's range lock keeps the
 * entry alive); the scratch buffer is per call.
 */
static int
decompress(struct vdsk *d, uint64_t e, uint64_t guest, uint8_t *out)
{
	struct qcow2 *q = d->priv;
	uint64_t coff = e & q->coff_mask, nb, csize;
	uint8_t *zbuf;
	ssize_t got;
	int r;

	nb = ((e >> q->csize_shift) & q->csize_mask) + 1;
	csize = nb * 512 - (coff & 511);
	if (csize > 2 * q->cs)
		return corrupt(d, "compressed cluster size for guest offset",
		    guest, e);
	if ((zbuf = malloc((size_t)csize)) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	/* the last compressed cluster may end before its last sector */
	do {
		got = pread(d->fd, zbuf, (size_t)csize, (off_t)coff);
	} while (got < 0 && errno == EINTR);
	if (got < 0)
		r = vdsk_error(errno, "%s: reading compressed cluster at "
		    "%#llx: %s", d->path, (unsigned long long)coff,
		    strerror(errno));
	else
		r = inflate_cluster(d, zbuf, (size_t)got, out, guest);
	free(zbuf);
	return r;
}

/* Remember a decompressed cluster for the next small read of it. */
static void
dbuf_store(struct vdsk *d, uint64_t e, const uint8_t *data)
{
	struct qcow2 *q = d->priv;

	vdsk_meta_lock(d);
	if (q->dbuf == NULL)
		q->dbuf = malloc(q->cs);
	if (q->dbuf != NULL) {
		memcpy(q->dbuf, data, q->cs);
		q->dbuf_entry = e;
	}
	vdsk_meta_unlock(d);
}

static int
inflate_cluster(struct vdsk *d, const uint8_t *zbuf, size_t got,
    uint8_t *dbuf, uint64_t guest)
{
	struct qcow2 *q = d->priv;
	int ok = 0;

	if (q->ctype == 0) {
		z_stream z;

		memset(&z, 0, sizeof(z));
		if (inflateInit2(&z, -12) != Z_OK)
			return vdsk_error(ENOMEM, "%s: inflateInit failed",
			    d->path);
		z.next_in = (Bytef *)zbuf;
		z.avail_in = (uInt)got;
		z.next_out = dbuf;
		z.avail_out = (uInt)q->cs;
		{
			int zr = inflate(&z, Z_FINISH);

			ok = (zr == Z_STREAM_END || zr == Z_BUF_ERROR ||
			    zr == Z_OK) && z.avail_out == 0;
		}
		inflateEnd(&z);
	} else {
		ZSTD_DCtx *zc = ZSTD_createDCtx();
		ZSTD_inBuffer in = { zbuf, got, 0 };
		ZSTD_outBuffer out = { dbuf, (size_t)q->cs, 0 };

		if (zc == NULL)
			return vdsk_error(ENOMEM, "out of memory");
		ok = 1;
		while (out.pos < out.size) {
			size_t before_in = in.pos, before_out = out.pos;
			size_t zr = ZSTD_decompressStream(zc, &out, &in);

			if (ZSTD_isError(zr) || (in.pos == before_in &&
			    out.pos == before_out)) {
				ok = 0;
				break;
			}
		}
		ZSTD_freeDCtx(zc);
	}
	if (!ok)
		return vdsk_error(EIO, "%s: corrupt image: compressed cluster "
		    "for guest offset %#llx does not decompress", d->path,
		    (unsigned long long)guest);
	return 0;
}

/* Map the run at off that can be done with one I/O (meta lock held). */
static int
map_run(struct vdsk *d, uint64_t off, size_t len, enum ckind *k,
    uint64_t *host, size_t *np)
{
	enum ckind k2;
	uint64_t host2;
	size_t n, n2;
	int r;

	if ((r = map(d, off, len, k, host, &n)) < 0)
		return r;
	/* extend the run over pieces that can share one I/O */
	while (n < len && *k != C_COMPRESSED) {
		if ((r = map(d, off + n, len - n, &k2, &host2, &n2)) < 0)
			return r;
		if (k2 != *k || (*k == C_NORMAL && host2 != *host + n))
			break;
		n += n2;
	}
	*np = n;
	return 0;
}

/* Read one mapped run (without the metadata lock). */
static int
read_run(struct vdsk *d, uint8_t *p, uint64_t off, size_t n, enum ckind k,
    uint64_t host, uint8_t **cb)
{
	struct qcow2 *q = d->priv;
	int r;

	switch (k) {
	case C_UNALLOC:
		return vdsk_read_backing(d, p, off, n);
	case C_ZERO:
		memset(p, 0, n);
		return 0;
	case C_NORMAL:
		return vdsk_pread(d, p, n, host, "data cluster");
	case C_COMPRESSED:
	default:
		if (*cb == NULL && (*cb = malloc(q->cs)) == NULL)
			return vdsk_error(ENOMEM, "out of memory");
		if ((r = decompress(d, host, off, *cb)) < 0)
			return r;
		memcpy(p, *cb + (off & (q->cs - 1)), n);
		dbuf_store(d, host, *cb);
		return 0;
	}
}

int
qcow2_read(struct vdsk *d, void *buf, uint64_t off, size_t len)
{
	struct qcow2 *q = d->priv;
	uint8_t *p = buf, *cb = NULL;
	enum ckind k = C_UNALLOC;
	uint64_t host = 0;
	size_t n = 0;
	int r = 0, hit;

	while (len > 0) {
		vdsk_meta_lock(d);
		r = map_run(d, off, len, &k, &host, &n);
		/* a compressed cluster decompressed last time */
		hit = r == 0 && k == C_COMPRESSED && q->dbuf != NULL &&
		    q->dbuf_entry == host;
		if (hit)
			memcpy(p, q->dbuf + (off & (q->cs - 1)), n);
		vdsk_meta_unlock(d);
		if (r < 0)
			break;
		if (!hit && (r = read_run(d, p, off, n, k, host, &cb)) < 0)
			break;
		p += n;
		off += n;
		len -= n;
	}
	free(cb);
	return r;
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

int
qcow2_write_l1_entry(struct vdsk *d, uint64_t l1i)
{
	struct qcow2 *q = d->priv;
	uint8_t e[8];

	be64_put(e, q->l1[l1i]);
	return vdsk_pwrite(d, e, 8, q->l1_offset + l1i * 8, "L1 entry");
}

/* Drop the references an L2 entry holds on host clusters. */
static int
release_entry(struct vdsk *d, uint64_t e)
{
	struct qcow2 *q = d->priv;
	uint64_t o, l;

	qcow2_entry_range(q, e, &o, &l);
	if (l == 0)
		return 0;
	if (e & OFLAG_COMPRESSED && q->dbuf_entry == e)
		q->dbuf_entry = 0;
	return qcow2_update_refcount(d, o, l, -1);
}

/*
 * Make sure the L1 entry points to a writable (refcount 1) L2 table,
 * allocating one or copying a shared one (copy-on-write).  With
 * 'create' 0, a missing table is not allocated (*l2o = 0).
 */
static int
l2_for_write(struct vdsk *d, uint64_t l1i, int create, uint64_t *l2o)
{
	struct qcow2 *q = d->priv;
	uint64_t rc, nl2, old = 0, i, e;
	uint8_t *t;
	int r;

	if ((r = l2_offset(d, l1i, l2o)) < 0)
		return r;
	if (*l2o != 0) {
		if (q->l1[l1i] & OFLAG_COPIED)
			return 0;
		if ((r = qcow2_get_refcount(d, *l2o, &rc)) < 0)
			return r;
		if (rc == 0)
			return corrupt(d, "L2 table with refcount 0 at L1 index",
			    l1i, q->l1[l1i]);
		if (rc == 1) {
			nl2 = *l2o;
		} else {
			/* shared with a snapshot: copy it */
			old = *l2o;
			if ((r = qcow2_cache_get(d, &q->l2c, old, 0, &t)) < 0)
				return r;
			memcpy(q->cbuf, t, q->cs);
			for (i = 0; i < q->cs; i += q->l2e_size) {
				e = be64_get(q->cbuf + i);
				be64_put(q->cbuf + i, e & ~OFLAG_COPIED);
			}
			if ((r = qcow2_alloc_clusters(d, 1, &nl2)) < 0)
				return r;
			if ((r = vdsk_pwrite(d, q->cbuf, q->cs, nl2,
			    "L2 table")) < 0)
				return r;
			if ((r = qcow2_cache_get(d, &q->l2c, nl2, 1, &t)) < 0)
				return r;
			memcpy(t, q->cbuf, q->cs);
		}
	} else {
		if (!create)
			return 0;
		if ((r = qcow2_alloc_clusters(d, 1, &nl2)) < 0)
			return r;
		if ((r = qcow2_cache_get(d, &q->l2c, nl2, 1, &t)) < 0)
			return r;
		if ((r = vdsk_pwrite(d, t, q->cs, nl2, "L2 table")) < 0)
			return r;
	}
	q->l1[l1i] = nl2 | OFLAG_COPIED;
	*l2o = nl2;
	if ((r = qcow2_write_l1_entry(d, l1i)) < 0)
		return r;
	if (old != 0)
		r = qcow2_update_refcount(d, old, q->cs, -1);
	return r;
}

/* Set the L2 entry of guest cluster cl (table l2o) and free the old one. */
static int
set_l2_entry(struct vdsk *d, uint64_t l2o, uint64_t cl, uint64_t ne,
    uint64_t old)
{
	struct qcow2 *q = d->priv;
	uint64_t l2i = cl & ((1ULL << q->l2_bits) - 1);
	uint8_t eb[8], *t;
	int r;

	/* allocations may have evicted the table from the cache */
	if ((r = qcow2_cache_get(d, &q->l2c, l2o, 0, &t)) < 0)
		return r;
	be64_put(eb, ne);
	memcpy(t + l2i * 8, eb, 8);
	if ((r = vdsk_pwrite(d, eb, 8, l2o + l2i * 8, "L2 entry")) < 0)
		return r;
	/* a reused preallocated cluster keeps its reference */
	if (old != 0 && !(!(old & OFLAG_COMPRESSED) &&
	    !(ne & OFLAG_COMPRESSED) && (old & L2E_OFFSET_MASK) ==
	    (ne & L2E_OFFSET_MASK)))
		r = release_entry(d, old);
	return r;
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
	uint64_t inoff = off - gco, l2o, e, host = 0, nh, l2i;
	uint8_t *t, *cbuf = NULL;
	const uint8_t *src = data;
	enum ckind k;
	int r;

	vdsk_meta_lock(d);
	if ((r = l2_for_write(d, cl >> q->l2_bits, 1, &l2o)) < 0)
		goto out;
	if ((r = qcow2_cache_get(d, &q->l2c, l2o, 0, &t)) < 0)
		goto out;
	l2i = cl & ((1ULL << q->l2_bits) - 1);
	e = be64_get(t + l2i * 8);
	if ((r = classify(d, off, e, &k, &host)) < 0)
		goto out;
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
		else if (k == C_COMPRESSED)
			r = decompress(d, e, off, cbuf);
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
	} else if ((r = qcow2_alloc_clusters(d, 1, &nh)) < 0) {
		goto out;
	}
	vdsk_meta_unlock(d);
	if ((r = vdsk_pwrite(d, src, q->cs, nh, "data cluster")) < 0)
		goto out_free;
	vdsk_meta_lock(d);
	r = set_l2_entry(d, l2o, cl, nh | OFLAG_COPIED, e);
out:
	vdsk_meta_unlock(d);
out_free:
	free(cbuf);
	return r;
}

/*
 * Sequential writes (convert, guest streaming): whole clusters at the
 * cluster-aligned off that are not allocated yet (unallocated or plain
 * zero entries, nothing to copy or free) and share one L2 table get a
 * run of contiguous host clusters: refcounts in one write per refcount
 * block, the data in one pwrite, the L2 entries in one pwrite.  Sets
 * *done to the bytes written, 0 if the run is shorter than 2 clusters
 * (the caller then goes cluster by cluster).  data NULL: the data is
 * len bytes of file sfd at soff, copied in the kernel (copy_in; runs of
 * one cluster are taken too).  Order on disk: refcounts, data, then the
 * L2 entries that point at it.
 */
static int
write_run(struct vdsk *d, uint64_t off, const uint8_t *data, size_t len,
    size_t *done, int sfd, uint64_t soff)
{
	struct qcow2 *q = d->priv;
	uint64_t cl = off >> q->cluster_bits, l2o, e, l2i, m, i, max, nh;
	uint64_t mask = (1ULL << q->l2_bits) - 1;
	uint8_t *t, *eb = NULL;
	int r;

	*done = 0;
	max = len >> q->cluster_bits;
	if (max > (mask + 1) - (cl & mask))
		max = (mask + 1) - (cl & mask);
	if (max < (data ? 2u : 1u) || q->extl2)
		return 0;
	vdsk_meta_lock(d);
	if ((r = l2_for_write(d, cl >> q->l2_bits, 1, &l2o)) < 0)
		goto out;
	if ((r = qcow2_cache_get(d, &q->l2c, l2o, 0, &t)) < 0)
		goto out;
	l2i = cl & mask;
	for (m = 0; m < max; m++) {
		e = be64_get(t + (l2i + m) * 8);
		if (e != 0 && e != OFLAG_ZERO)
			break;
	}
	if (m < (data ? 2u : 1u))
		goto out;
	if ((r = qcow2_alloc_clusters(d, m, &nh)) < 0)
		goto out;
	vdsk_meta_unlock(d);
	if ((eb = malloc(m * 8)) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	for (i = 0; i < m; i++)
		be64_put(eb + i * 8, (nh + (i << q->cluster_bits)) |
		    OFLAG_COPIED);
	if (data != NULL)
		r = vdsk_pwrite(d, data, m << q->cluster_bits, nh,
		    "data clusters");
	else
		r = vdsk_copy_file(d, sfd, soff, nh, m << q->cluster_bits,
		    "data clusters");
	if (r < 0)
		goto out_free;
	vdsk_meta_lock(d);
	/* allocations may have evicted the table from the cache */
	if ((r = qcow2_cache_get(d, &q->l2c, l2o, 0, &t)) < 0)
		goto out;
	memcpy(t + l2i * 8, eb, m * 8);
	if ((r = vdsk_pwrite(d, eb, m * 8, l2o + l2i * 8, "L2 entries")) < 0)
		goto out;
	*done = m << q->cluster_bits;
out:
	vdsk_meta_unlock(d);
out_free:
	free(eb);
	return r;
}

int
qcow2_write(struct vdsk *d, const void *buf, uint64_t off, size_t len)
{
	struct qcow2 *q = d->priv;
	const uint8_t *p = buf;
	size_t n;
	int r;

	while (len > 0) {
		n = 0;
		if ((off & (q->cs - 1)) == 0 && len >= 2 * q->cs &&
		    (r = write_run(d, off, p, len, &n, -1, 0)) < 0)
			return r;
		if (n == 0) {
			n = q->cs - (off & (q->cs - 1));
			if (n > len)
				n = len;
			if ((r = write_cluster(d, off, p, n)) < 0)
				return r;
		}
		p += n;
		off += n;
		len -= n;
	}
	return 0;
}

/*
 * The copy_in op (convert): runs of whole unallocated clusters through
 * write_run from the file, the rest (partial or allocated clusters)
 * read into a buffer and written like qcow2_write.
 */
int
qcow2_copy_in(struct vdsk *d, uint64_t off, size_t len, int sfd,
    uint64_t soff)
{
	struct qcow2 *q = d->priv;
	uint8_t *b = NULL;
	size_t n;
	int r = 0;

	while (len > 0 && r == 0) {
		n = 0;
		if ((off & (q->cs - 1)) == 0 && len >= q->cs &&
		    (r = write_run(d, off, NULL, len, &n, sfd, soff)) < 0)
			break;
		if (n == 0) {
			n = q->cs - (off & (q->cs - 1));
			if (n > len)
				n = len;
			if (b == NULL && (b = malloc(q->cs)) == NULL) {
				r = vdsk_error(ENOMEM, "out of memory");
				break;
			}
			if ((r = vdsk_read_fd(sfd, b, n, soff)) < 0) {
				r = vdsk_error(-r, "%s: reading the source to "
				    "copy to %#llx: %s", d->path,
				    (unsigned long long)off, r == -EIO ?
				    "beyond the end of the file" :
				    strerror(-r));
				break;
			}
			r = qcow2_write(d, b, off, n);
		}
		off += n;
		soff += n;
		len -= n;
	}
	free(b);
	return r;
}

/* The host_extent op: plain (uncompressed, allocated) cluster runs. */
int
qcow2_host_extent(struct vdsk *d, uint64_t off, uint64_t len,
    uint64_t *host, uint64_t *pnum)
{
	enum ckind k;
	size_t n = 0, max = len > SIZE_MAX ? SIZE_MAX : (size_t)len;
	int r;

	vdsk_meta_lock(d);
	r = map_run(d, off, max, &k, host, &n);
	vdsk_meta_unlock(d);
	if (r < 0)
		return r;
	*pnum = n;
	return k == C_NORMAL;
}

static int
discard_locked(struct vdsk *d, uint64_t off, uint64_t len)
{
	struct qcow2 *q = d->priv;
	uint64_t end = off + len, cl, l2o, e, ne, l2i;
	uint8_t *t;
	enum ckind k;
	int r;

	/* whole clusters only; the last partial cluster of the disk counts */
	off = (off + q->cs - 1) & ~(q->cs - 1);
	if (end != d->size)
		end &= ~(q->cs - 1);
	for (; off < end; off += q->cs) {
		cl = off >> q->cluster_bits;
		ne = d->backing != NULL || d->backing_file[0] ? OFLAG_ZERO : 0;
		if (ne && q->version < 3)
			continue;       /* v2 cannot hide the backing file */
		if ((r = l2_for_write(d, cl >> q->l2_bits, ne != 0, &l2o)) < 0)
			return r;
		if (l2o == 0)
			continue;
		if ((r = qcow2_cache_get(d, &q->l2c, l2o, 0, &t)) < 0)
			return r;
		l2i = cl & ((1ULL << q->l2_bits) - 1);
		e = be64_get(t + l2i * 8);
		if (qcow2_entry_kind(d, e, &k) < 0)
			return corrupt(d, "L2 entry for guest cluster", cl, e);
		if (e == ne)
			continue;
		if ((r = set_l2_entry(d, l2o, cl, ne, 0)) < 0)
			return r;
		if ((r = release_entry(d, e)) < 0)
			return r;
	}
	return 0;
}

/* Discard: metadata only (the caller range-locks the clusters). */
int
qcow2_discard(struct vdsk *d, uint64_t off, uint64_t len)
{
	int r;

	vdsk_meta_lock(d);
	r = discard_locked(d, off, len);
	vdsk_meta_unlock(d);
	return r;
}

int
qcow2_write_compressed(struct vdsk *d, const void *buf, uint64_t off,
    size_t len)
{
	struct qcow2 *q = d->priv;
	uint64_t cl = off >> q->cluster_bits, l2o, e, place, nb, room;
	uint8_t *t, *cbuf, *zbuf;
	size_t clen;
	int r;

	if ((off & (q->cs - 1)) || (len != q->cs && off + len != d->size) ||
	    len > q->cs)
		return vdsk_error(EINVAL, "%s: compressed writes take one "
		    "whole, aligned cluster", d->path);
	/* compress outside the metadata lock, into per-call buffers */
	cbuf = malloc(q->cs);
	zbuf = malloc(q->cs);
	if (cbuf == NULL || zbuf == NULL) {
		r = vdsk_error(ENOMEM, "out of memory");
		goto out_free;
	}
	memcpy(cbuf, buf, len);
	memset(cbuf + len, 0, q->cs - len);
	if (q->ctype == 0) {
		z_stream z;
		int zr;

		memset(&z, 0, sizeof(z));
		if (deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9,
		    Z_DEFAULT_STRATEGY) != Z_OK) {
			r = vdsk_error(ENOMEM, "%s: deflateInit failed",
			    d->path);
			goto out_free;
		}
		z.next_in = cbuf;
		z.avail_in = (uInt)q->cs;
		z.next_out = zbuf;
		z.avail_out = (uInt)q->cs;
		zr = deflate(&z, Z_FINISH);
		clen = zr == Z_STREAM_END ? q->cs - z.avail_out : q->cs;
		deflateEnd(&z);
	} else {
		size_t zr = ZSTD_compress(zbuf, q->cs, cbuf, q->cs, 0);

		clen = ZSTD_isError(zr) ? q->cs : zr;
	}
	if (clen >= q->cs - 512 || q->version < 2) {
		r = qcow2_write(d, buf, off, len);      /* does not pay */
		goto out_free;
	}

	vdsk_meta_lock(d);
	if ((r = l2_for_write(d, cl >> q->l2_bits, 1, &l2o)) < 0)
		goto out;
	if ((r = qcow2_cache_get(d, &q->l2c, l2o, 0, &t)) < 0)
		goto out;
	e = be64_get(t + (cl & ((1ULL << q->l2_bits) - 1)) * 8);
	/* pack into the current partly used host cluster if it fits */
	room = q->comp_cur ? q->cs - (q->comp_cur & (q->cs - 1)) : 0;
	if (q->comp_cur && (q->comp_cur & (q->cs - 1)) && clen <= room) {
		place = q->comp_cur;
		if ((r = qcow2_update_refcount(d, place, 1, 1)) < 0)
			goto out;
	} else if ((r = qcow2_alloc_clusters(d, 1, &place)) < 0) {
		goto out;
	}
	/* small; written under the lock so packing stays simple */
	if ((r = vdsk_pwrite(d, zbuf, clen, place, "compressed data")) < 0)
		goto out;
	q->comp_cur = place + clen;
	nb = ((place & 511) + clen + 511) / 512;
	r = set_l2_entry(d, l2o, cl, OFLAG_COMPRESSED |
	    ((nb - 1) << q->csize_shift) | place, e);
out:
	vdsk_meta_unlock(d);
out_free:
	free(cbuf);
	free(zbuf);
	return r;
}

/* Is any guest cluster at or above index 'from' allocated? */
static int
tail_allocated(struct vdsk *d, uint64_t from, int *yes)
{
	struct qcow2 *q = d->priv;
	uint64_t cl, l2o, e;
	uint32_t l1i;
	uint8_t *t;
	int r;

	*yes = 0;
	for (l1i = (uint32_t)(from >> q->l2_bits); l1i < q->l1_size; l1i++) {
		if ((r = l2_offset(d, l1i, &l2o)) < 0)
			return r;
		if (l2o == 0)
			continue;
		if ((r = qcow2_cache_get(d, &q->l2c, l2o, 0, &t)) < 0)
			return r;
		for (cl = (uint64_t)l1i << q->l2_bits;
		    cl < ((uint64_t)l1i + 1) << q->l2_bits; cl++) {
			if (cl < from)
				continue;
			e = be64_get(t + (cl & ((1ULL << q->l2_bits) - 1)) *
			    q->l2e_size);
			if ((e & ~OFLAG_ZERO) != 0) {
				*yes = 1;
				return 0;
			}
		}
	}
	return 0;
}

/*
 * Resize (the caller holds the whole-image range lock).  Sets *zfrom,
 * *zto to a guest range that must be overwritten with zeroes afterwards.
 */
static int
resize_locked(struct vdsk *d, uint64_t size, uint64_t *zfrom, uint64_t *zto)
{
	struct qcow2 *q = d->priv;
	uint64_t old = d->size, end;
	uint8_t hdr[8];
	int yes, r;

	*zfrom = *zto = 0;
	if (q->nb_snapshots)
		return vdsk_error(ENOTSUP, "%s: cannot resize an image that "
		    "has internal snapshots", d->path);
	if (size == old)
		return 0;
	if (size < old) {
		if ((r = tail_allocated(d, (size + q->cs - 1) >>
		    q->cluster_bits, &yes)) < 0)
			return r;
		if (yes)
			return vdsk_error(ENOTSUP, "%s: cannot shrink to %llu "
			    "bytes: data is allocated beyond that size",
			    d->path, (unsigned long long)size);
		be64_put(hdr, size);
		if ((r = vdsk_pwrite(d, hdr, 8, 24, "header")) < 0)
			return r;
		d->size = size;
		return 0;
	}
	if ((r = qcow2_grow(d, size)) < 0)
		return r;
	/* zero what a shrink left behind in the old last cluster */
	end = (old + q->cs - 1) & ~(q->cs - 1);
	if (end > size)
		end = size;
	if (end > old) {
		enum ckind k;
		uint64_t host;
		size_t n;

		if ((r = map(d, old, (size_t)(end - old), &k, &host, &n)) < 0)
			return r;
		if (k != C_UNALLOC && k != C_ZERO) {
			*zfrom = old;
			*zto = end;
		}
	}
	return 0;
}

int
qcow2_resize(struct vdsk *d, uint64_t size)
{
	uint64_t zfrom, zto;
	uint8_t *z;
	int r;

	vdsk_meta_lock(d);
	r = resize_locked(d, size, &zfrom, &zto);
	vdsk_meta_unlock(d);
	if (r == 0 && zto > zfrom) {
		if ((z = calloc(1, (size_t)(zto - zfrom))) == NULL)
			return vdsk_error(ENOMEM, "out of memory");
		r = qcow2_write(d, z, zfrom, (size_t)(zto - zfrom));
		free(z);
	}
	return r < 0 ? r : qcow2_flush(d);
}

/* Allocation status from the L2 tables (see vdsk_ops.block_status). */
int
qcow2_block_status(struct vdsk *d, uint64_t off, uint64_t len,
    uint64_t *pnum)
{
	static const int bs[] = { [C_UNALLOC] = VDSK_BS_UNALLOCATED,
	    [C_ZERO] = VDSK_BS_ZERO, [C_NORMAL] = VDSK_BS_DATA,
	    [C_COMPRESSED] = VDSK_BS_DATA };
	struct qcow2 *q = d->priv;
	uint64_t pos = off, end = off + len, l2span, l2o, host, next, chunk;
	enum ckind k, k0 = C_UNALLOC;
	size_t n;
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
			chunk = end - pos < q->cs ? end - pos : q->cs;
			if ((r = map(d, pos, (size_t)chunk, &k, &host,
			    &n)) < 0)
				break;
			next = pos + n;
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

int
qcow2_flush(struct vdsk *d)
{
	if (fsync(d->fd) < 0)
		return vdsk_error(errno, "%s: fsync: %s", d->path,
		    strerror(errno));
	return 0;
}

/* Entries needed in the L1 table for a virtual size. */
uint64_t
qcow2_l1_entries_for(const struct qcow2 *q, uint64_t size)
{
	uint32_t sh = q->cluster_bits + q->l2_bits;

	return (size >> sh) + ((size & ((1ULL << sh) - 1)) != 0);
}

/* Grow the virtual size, moving the L1 table if it must grow. */
int
qcow2_grow(struct vdsk *d, uint64_t size)
{
	struct qcow2 *q = d->priv;
	uint64_t need = qcow2_l1_entries_for(q, size), nc, off, i, *nl1;
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
	r = qcow2_alloc_clusters(d, nc, &off);
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
		r = qcow2_set_refcount(d, old_off + (i << q->cluster_bits), 0);
	return r;
}

