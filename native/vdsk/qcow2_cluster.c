/*
 * libvdsk qcow2: guest to host cluster mapping, reads, copy-on-write
 * writes, virtual size growth.
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
	if ((r = qcow2_cache_get(d, &q->l2c, l2o, 0, &t)) < 0)
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

int
qcow2_read(struct vdsk *d, void *buf, uint64_t off, size_t len)
{
	struct qcow2 *q = d->priv;
	uint8_t *p = buf;
	enum ckind k, k2;
	uint64_t host, host2, inoff;
	size_t n, step;
	int r;

	while (len > 0) {
		inoff = off & (q->cs - 1);
		if ((r = lookup(d, off, &k, &host)) < 0)
			return r;
		n = q->cs - inoff < len ? (size_t)(q->cs - inoff) : len;
		/* extend the run over clusters that can share one I/O */
		while (n < len && k != C_COMPRESSED) {
			if ((r = lookup(d, off + n, &k2, &host2)) < 0)
				return r;
			if (k2 != k || (k == C_NORMAL &&
			    host2 != host + inoff + n))
				break;
			step = len - n < q->cs ? len - n : (size_t)q->cs;
			n += step;
		}
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
		if ((r = qcow2_get_refcount(d, *l2o, &rc)) < 0)
			return r;
		if (rc != 1)
			return vdsk_error(ENOTSUP, "%s: L2 table %#llx is "
			    "shared (refcount %llu); copy-on-write of "
			    "tables is not supported", d->path,
			    (unsigned long long)*l2o,
			    (unsigned long long)rc);
		nl2 = *l2o;
	} else {
		if ((r = qcow2_alloc_clusters(d, 1, &nl2)) < 0)
			return r;
		if ((r = qcow2_cache_get(d, &q->l2c, nl2, 1, &t)) < 0)
			return r;
		if ((r = vdsk_pwrite(d, t, q->cs, nl2, "L2 table")) < 0)
			return r;
	}
	q->l1[l1i] = nl2 | OFLAG_COPIED;
	be64_put(e, q->l1[l1i]);
	*l2o = nl2;
	return vdsk_pwrite(d, e, 8, q->l1_offset + l1i * 8, "L1 entry");
}

static int
write_cluster(struct vdsk *d, uint64_t off, const uint8_t *data, size_t n)
{
	struct qcow2 *q = d->priv;
	uint64_t cl = off >> q->cluster_bits, gco = cl << q->cluster_bits;
	uint64_t inoff = off - gco, l2o, e, host, nh, l2i;
	uint8_t *t, eb[8];
	enum ckind k;
	int r;

	if ((r = l2_for_write(d, cl >> q->l2_bits, &l2o)) < 0)
		return r;
	if ((r = qcow2_cache_get(d, &q->l2c, l2o, 0, &t)) < 0)
		return r;
	l2i = cl & ((1ULL << q->l2_bits) - 1);
	e = be64_get(t + l2i * 8);
	if ((r = classify(d, off, e, &k, &host)) < 0)
		return r;
	if (k == C_COMPRESSED)
		return vdsk_error(ENOTSUP, "%s: writing to compressed "
		    "clusters is not supported yet (guest offset %#llx)",
		    d->path, (unsigned long long)off);
	if (k == C_NORMAL && (e & OFLAG_COPIED)) {
		if ((r = check_data_host(d, host)) < 0)
			return r;
		return vdsk_pwrite(d, data, n, host + inoff, "data");
	}
	/* Build the whole new cluster: old contents + new data. */
	if (n < q->cs) {
		if (k == C_ZERO)
			memset(q->cbuf, 0, q->cs);
		else if (k == C_NORMAL)
			r = vdsk_pread(d, q->cbuf, q->cs, host, "data cluster");
		else
			r = vdsk_read_backing(d, q->cbuf, gco, q->cs);
		if (r < 0)
			return r;
	}
	memcpy(q->cbuf + inoff, data, n);
	if (k == C_ZERO && host != 0 && (e & OFLAG_COPIED)) {
		/* preallocated zero cluster: reuse it */
		if ((r = check_data_host(d, host)) < 0)
			return r;
		nh = host;
		host = 0;
	} else if ((r = qcow2_alloc_clusters(d, 1, &nh)) < 0) {
		return r;
	}
	if ((r = vdsk_pwrite(d, q->cbuf, q->cs, nh, "data cluster")) < 0)
		return r;
	/* alloc may have evicted the table from the cache */
	if ((r = qcow2_cache_get(d, &q->l2c, l2o, 0, &t)) < 0)
		return r;
	be64_put(eb, nh | OFLAG_COPIED);
	memcpy(t + l2i * 8, eb, 8);
	if ((r = vdsk_pwrite(d, eb, 8, l2o + l2i * 8, "L2 entry")) < 0)
		return r;
	if (host != 0) {
		uint64_t rc;

		if ((r = qcow2_get_refcount(d, host, &rc)) < 0)
			return r;
		if (rc > 0)
			r = qcow2_set_refcount(d, host, rc - 1);
	}
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

