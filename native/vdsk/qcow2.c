/*
 * libvdsk qcow2 driver: versions 2 and 3 read, write with cluster
 * allocation.  Metadata updates are written through (entry by entry) in
 * the order refcount -> data -> L2 -> L1, so the file never references a
 * cluster whose refcount is not yet on disk.  Whole-cluster writes over
 * unallocated clusters allocate a contiguous run at once (one write for
 * its refcounts, one for the data, one for its L2 entries).  New clusters go to the first
 * free (refcount 0) run in the file, else at its end.  Refcounts are kept
 * exact (lazy refcounts are never used; the dirty bit is never set); a
 * dirty image from qemu gets its refcounts rebuilt on a writable open.
 * The header is only patched field by field, so unknown header extensions
 * and compatible feature bits stay as they are; auto-clear bits are
 * cleared on a writable open.
 *
 * Files: qcow2.c header/open/create, qcow2_cluster.c mapping and data,
 * qcow2_refcount.c caches and refcounts, qcow2_snapshot.c internal
 * snapshots, qcow2_check.c consistency check and repair.
 *
 * Memory is bounded: the L1 and refcount tables are held in memory (their
 * sizes are capped like QEMU's, 32 MiB and 8 MiB), L2 tables and refcount
 * blocks go through small LRU caches.
 *
 * Concurrency (the driver is threadsafe): the common layer range-locks
 * whole clusters per read/write request, and the whole image for resize,
 * snapshot create/apply/delete and check.  Every access to metadata (L1,
 * L2, refcounts, the caches, the allocator state, the snapshot table, the
 * one-cluster scratch q->cbuf) is under vdsk_meta_lock(); data reads,
 * writes and (de)compression are done outside it with per-call buffers.
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

int
qcow2_load_table(struct vdsk *d, uint64_t off, uint64_t n, uint64_t **out,
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
	q->extl2 = (q->incompat & INCOMPAT_EXTL2) != 0;
	q->l2e_size = q->extl2 ? 16 : 8;
	q->l2_bits = q->cluster_bits - (q->extl2 ? 4 : 3);
	q->csize_shift = 62 - (q->cluster_bits - 8);
	q->csize_mask = (1ULL << (q->cluster_bits - 8)) - 1;
	q->coff_mask = (1ULL << q->csize_shift) - 1;
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
	if (rw && q->extl2)
		return vdsk_error(ENOTSUP, "%s: writing qcow2 images with "
		    "extended L2 entries (subclusters) is not supported; open "
		    "it read-only", d->path);
	if (q->header_length > 104)
		ctype = hc[104];
	if ((q->incompat & INCOMPAT_COMPRESSION) ? ctype != 1 : ctype != 0)
		return vdsk_error(EINVAL, "%s: invalid compression type %u",
		    d->path, ctype);
	q->ctype = ctype;
	if (rw && (q->incompat & INCOMPAT_CORRUPT))
		return vdsk_error(EROFS, "%s: image is marked corrupt; open it "
		    "read-only or repair it (qemu-img check -r all)", d->path);

	d->size = be64_get(hc + 24);
	if (d->size > (uint64_t)INT64_MAX)
		return vdsk_error(EFBIG, "%s: virtual size too large", d->path);
	q->l1_size = be32_get(hc + 36);
	q->l1_offset = be64_get(hc + 40);
	if ((uint64_t)q->l1_size > MAX_L1_BYTES / 8)
		return vdsk_error(EFBIG, "%s: L1 table too large (%u entries)",
		    d->path, q->l1_size);
	l1need = qcow2_l1_entries_for(q, d->size);
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
	q->snap_off = snap_off;
	return 0;
}

/*
 * A dirty image (lazy refcounts, not closed cleanly): rebuild the
 * refcounts from the L1/L2 tables and clear the dirty bit, or refuse.
 */
static int
repair_dirty(struct vdsk *d)
{
	struct qcow2 *q = d->priv;
	struct vdsk_check res;
	uint8_t b[8];
	int r;

	r = qcow2_check(d, QCOW2_CHECK_REPAIR_ALL, &res);
	if (r == 0 && res.corruptions != 0)
		r = vdsk_error(EROFS, "%s: image is marked dirty and its "
		    "refcounts cannot be repaired (%llu errors left); open it "
		    "read-only or run qemu-img check -r all", d->path,
		    (unsigned long long)res.corruptions);
	if (r < 0)
		return r;
	if ((r = qcow2_flush(d)) < 0)
		return r;
	q->incompat &= ~INCOMPAT_DIRTY;
	be64_put(b, q->incompat);
	if ((r = vdsk_pwrite(d, b, 8, 72, "header")) < 0)
		return r;
	return qcow2_flush(d);
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
	if ((r = qcow2_load_table(d, q->l1_offset, q->l1_size, &q->l1,
	    "L1 table")) < 0)
		return r;
	qcow2_cache_init(&q->l2c, "L2 table", q->cs,
	    d->l2_cache_bytes ? d->l2_cache_bytes : 4u << 20);
	qcow2_cache_init(&q->rbc, "refcount block", q->cs, 1u << 20);
	if ((r = qcow2_snap_load(d, q->nb_snapshots, q->snap_off)) < 0)
		return r;
	if ((d->flags & VDSK_RDONLY) && !(d->flags & VDSK_OPEN_CHECK))
		return 0;

	if ((q->cbuf = malloc(q->cs)) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	if ((r = qcow2_load_rt(d)) < 0)
		return r;
	q->next_free = (d->file_size + q->cs - 1) & ~(q->cs - 1);
	if (d->flags & VDSK_RDONLY)
		return 0;
	if ((q->incompat & INCOMPAT_DIRTY) && !(d->flags & VDSK_OPEN_CHECK) &&
	    (r = repair_dirty(d)) < 0)
		return r;
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

	qcow2_cache_free(&q->l2c);
	qcow2_cache_free(&q->rbc);
	free(q->l1);
	free(q->rt);
	free(q->cbuf);
	free(q->zbuf);
	free(q->dbuf);
	qcow2_snap_free(q);
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
	info->nb_snapshots = q->nb_snapshots;
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

/* Snapshots and check are metadata work from end to end. */
static int
snapshot_op(struct vdsk *d, int op, const char *name,
    struct vdsk_snapshot *out, int max)
{
	int r;

	vdsk_meta_lock(d);
	r = qcow2_snapshot(d, op, name, out, max);
	vdsk_meta_unlock(d);
	return r;
}

static int
check_op(struct vdsk *d, int flags, struct vdsk_check *res)
{
	int r;

	vdsk_meta_lock(d);
	r = qcow2_check(d, flags, res);
	vdsk_meta_unlock(d);
	return r;
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
	.discard = qcow2_discard,
	.resize = qcow2_resize,
	.write_compressed = qcow2_write_compressed,
	.snapshot = snapshot_op,
	.check = check_op,
	.block_status = qcow2_block_status,
	.set_backing = vdsk_qcow2_set_backing,
	.host_extent = qcow2_host_extent,
	.copy_in = qcow2_copy_in,
	.threadsafe = 1,
};

