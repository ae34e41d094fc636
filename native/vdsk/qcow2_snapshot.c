/*
 * libvdsk qcow2: internal snapshots.  The snapshot table is read and
 * written as qemu does (unknown extra data is kept).  Refcounts follow
 * qemu's model: a cluster's refcount is the number of paths to it from
 * the active L1 table and the snapshots' L1 tables, so a snapshot adds
 * one to every L2 table and data cluster the active table reaches.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "qcow2.h"

#define SN_FIXED        40
#define SN_EXTRA_NEW    24

void
qcow2_snap_free(struct qcow2 *q)
{
	uint32_t i;

	if (q->snaps == NULL)
		return;
	for (i = 0; i < q->nb_snapshots; i++) {
		free(q->snaps[i].id);
		free(q->snaps[i].name);
		free(q->snaps[i].extra);
	}
	free(q->snaps);
	q->snaps = NULL;
}

static char *
dupn(const uint8_t *p, size_t n)
{
	char *s = malloc(n + 1);

	if (s != NULL) {
		memcpy(s, p, n);
		s[n] = '\0';
	}
	return s;
}

int
qcow2_snap_load(struct vdsk *d, uint32_t nb, uint64_t off)
{
	struct qcow2 *q = d->priv;
	uint64_t pos = 0, avail;
	uint8_t *buf;
	uint32_t i;
	ssize_t got;

	q->snap_bytes = 0;
	if (nb == 0)
		return 0;
	if (off >= d->file_size)
		return vdsk_error(EINVAL, "%s: snapshot table beyond the end "
		    "of the file", d->path);
	avail = d->file_size - off;
	if (avail > MAX_SNAP_TABLE)
		avail = MAX_SNAP_TABLE;
	if ((buf = malloc(avail)) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	do {
		got = pread(d->fd, buf, (size_t)avail, (off_t)off);
	} while (got < 0 && errno == EINTR);
	if (got < 0) {
		free(buf);
		return vdsk_error(errno, "%s: reading snapshot table: %s",
		    d->path, strerror(errno));
	}
	avail = (uint64_t)got;
	if ((q->snaps = calloc(nb, sizeof(*q->snaps))) == NULL) {
		free(buf);
		return vdsk_error(ENOMEM, "out of memory");
	}
	for (i = 0; i < nb; i++) {
		struct qsnap *s = &q->snaps[i];
		uint8_t *p = buf + pos;
		uint32_t idl, nl, el;

		if (avail - pos < SN_FIXED)
			goto bad;
		s->l1_off = be64_get(p);
		s->l1_size = be32_get(p + 8);
		idl = be16_get(p + 12);
		nl = be16_get(p + 14);
		s->date_sec = be32_get(p + 16);
		s->date_nsec = be32_get(p + 20);
		s->vm_clock = be64_get(p + 24);
		s->vm_state_size = be32_get(p + 32);
		el = be32_get(p + 36);
		if (avail - pos - SN_FIXED < (uint64_t)el + idl + nl)
			goto bad;
		s->extra_size = el;
		s->disk_size = d->size;
		if (el >= 16)
			s->disk_size = be64_get(p + SN_FIXED + 8);
		if ((el && (s->extra = (uint8_t *)dupn(p + SN_FIXED, el)) == NULL) ||
		    (s->id = dupn(p + SN_FIXED + el, idl)) == NULL ||
		    (s->name = dupn(p + SN_FIXED + el + idl, nl)) == NULL) {
			q->nb_snapshots = i + 1;
			free(buf);
			return vdsk_error(ENOMEM, "out of memory");
		}
		if (s->l1_size > MAX_L1_BYTES / 8 || (s->l1_off & (q->cs - 1))
		    || (s->l1_size && s->l1_off == 0)) {
			q->nb_snapshots = i + 1;
			free(buf);
			return vdsk_error(EINVAL, "%s: snapshot %s has an invalid "
			    "L1 table", d->path, s->id);
		}
		pos += SN_FIXED + el + idl + nl;
		pos = (pos + 7) & ~7ULL;
		if (pos > avail && i + 1 < nb)
			goto bad;
	}
	free(buf);
	q->snap_bytes = pos;
	return 0;
bad:
	q->nb_snapshots = i;
	free(buf);
	return vdsk_error(EINVAL, "%s: snapshot table is truncated or "
	    "invalid (entry %u)", d->path, i);
}

/* Write the table for snaps[0..nb) elsewhere, switch the header to it. */
static int
snap_write(struct vdsk *d, struct qsnap *sn, uint32_t nb)
{
	struct qcow2 *q = d->priv;
	uint64_t bytes = 0, pos = 0, off = 0, old_off = q->snap_off;
	uint64_t old_bytes = q->snap_bytes;
	uint8_t *buf = NULL, h[12];
	uint32_t i;
	int r = 0;

	for (i = 0; i < nb; i++)
		bytes += (SN_FIXED + sn[i].extra_size + strlen(sn[i].id) +
		    strlen(sn[i].name) + 7) & ~7ULL;
	if (bytes > MAX_SNAP_TABLE)
		return vdsk_error(EFBIG, "%s: snapshot table too large",
		    d->path);
	if (nb) {
		uint64_t nc = (bytes + q->cs - 1) >> q->cluster_bits;

		if ((buf = calloc(1, nc << q->cluster_bits)) == NULL)
			return vdsk_error(ENOMEM, "out of memory");
		for (i = 0; i < nb; i++) {
			uint8_t *p = buf + pos;
			size_t idl = strlen(sn[i].id), nl = strlen(sn[i].name);

			be64_put(p, sn[i].l1_off);
			be32_put(p + 8, sn[i].l1_size);
			be16_put(p + 12, (uint16_t)idl);
			be16_put(p + 14, (uint16_t)nl);
			be32_put(p + 16, sn[i].date_sec);
			be32_put(p + 20, sn[i].date_nsec);
			be64_put(p + 24, sn[i].vm_clock);
			be32_put(p + 32, sn[i].vm_state_size);
			be32_put(p + 36, sn[i].extra_size);
			if (sn[i].extra_size)
				memcpy(p + SN_FIXED, sn[i].extra,
				    sn[i].extra_size);
			memcpy(p + SN_FIXED + sn[i].extra_size, sn[i].id, idl);
			memcpy(p + SN_FIXED + sn[i].extra_size + idl,
			    sn[i].name, nl);
			pos += (SN_FIXED + sn[i].extra_size + idl + nl + 7) &
			    ~7ULL;
		}
		r = qcow2_alloc_clusters(d, nc, &off);
		if (r == 0)
			r = vdsk_pwrite(d, buf, nc << q->cluster_bits, off,
			    "snapshot table");
		free(buf);
		if (r == 0)
			r = qcow2_flush(d);
		if (r < 0)
			return r;
	}
	be32_put(h, nb);
	be64_put(h + 4, off);
	if ((r = vdsk_pwrite(d, h, 12, 60, "header")) < 0)
		return r;
	if ((r = qcow2_flush(d)) < 0)
		return r;
	q->snap_off = off;
	q->snap_bytes = bytes;
	if (old_off && old_bytes)
		r = qcow2_update_refcount(d, old_off, old_bytes, -1);
	return r;
}

int
qcow2_update_l1_refs(struct vdsk *d, uint64_t *l1, uint32_t l1_size,
    int addend, int active)
{
	struct qcow2 *q = d->priv;
	uint64_t l2o, e, ne, o, l, rc, i, j;
	uint8_t *t, *tab;
	enum ckind k;
	int changed, r = 0;

	if ((tab = malloc(q->cs)) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	for (i = 0; i < l1_size && r == 0; i++) {
		l2o = l1[i] & L1E_OFFSET_MASK;
		if (l2o == 0)
			continue;
		if ((l1[i] & L1E_RESERVED) || (l2o & (q->cs - 1))) {
			r = qcow2_corrupt(d, "L1 entry", i, l1[i]);
			break;
		}
		if ((r = qcow2_cache_get(d, &q->l2c, l2o, 0, &t)) < 0)
			break;
		memcpy(tab, t, q->cs);
		changed = 0;
		for (j = 0; j < q->cs && r == 0; j += q->l2e_size) {
			e = be64_get(tab + j);
			if (qcow2_entry_kind(d, e, &k) < 0) {
				r = qcow2_corrupt(d, "L2 entry", j / q->l2e_size,
				    e);
				break;
			}
			qcow2_entry_range(q, e, &o, &l);
			if (l == 0)
				continue;
			if (addend && (r = qcow2_update_refcount(d, o, l,
			    addend)) < 0)
				break;
			if (!active || k == C_COMPRESSED)
				continue;
			if ((r = qcow2_get_refcount(d, o, &rc)) < 0)
				break;
			ne = rc == 1 ? e | OFLAG_COPIED : e & ~OFLAG_COPIED;
			if (ne != e) {
				be64_put(tab + j, ne);
				changed = 1;
			}
		}
		if (r < 0)
			break;
		if (changed) {
			if ((r = vdsk_pwrite(d, tab, q->cs, l2o,
			    "L2 table")) < 0)
				break;
			qcow2_cache_drop(&q->l2c, l2o);
		}
		if (addend && (r = qcow2_update_refcount(d, l2o, q->cs,
		    addend)) < 0)
			break;
		if (!active)
			continue;
		if ((r = qcow2_get_refcount(d, l2o, &rc)) < 0)
			break;
		ne = rc == 1 ? l1[i] | OFLAG_COPIED : l1[i] & ~OFLAG_COPIED;
		if (ne != l1[i]) {
			l1[i] = ne;
			r = qcow2_write_l1_entry(d, i);
		}
	}
	free(tab);
	return r;
}

static int
find(struct qcow2 *q, const char *name)
{
	uint32_t i;

	for (i = 0; i < q->nb_snapshots; i++)
		if (strcmp(q->snaps[i].id, name) == 0)
			return (int)i;
	for (i = 0; i < q->nb_snapshots; i++)
		if (strcmp(q->snaps[i].name, name) == 0)
			return (int)i;
	return -1;
}

static int
snap_create(struct vdsk *d, const char *name)
{
	struct qcow2 *q = d->priv;
	struct qsnap *nsn, *s;
	struct timespec ts;
	uint64_t l1off = 0, nc, i, maxid = 0;
	uint8_t *buf;
	char idbuf[32];
	int r;

	if (strlen(name) > 65535)
		return vdsk_error(EINVAL, "%s: snapshot name too long",
		    d->path);
	if (find(q, name) >= 0)
		return vdsk_error(EEXIST, "%s: a snapshot named '%s' exists",
		    d->path, name);
	if (q->nb_snapshots >= MAX_SNAPSHOTS)
		return vdsk_error(EFBIG, "%s: too many snapshots", d->path);
	if (q->refcount_order == 0)
		return vdsk_error(ENOTSUP, "%s: 1-bit refcounts cannot hold "
		    "internal snapshots", d->path);
	for (i = 0; i < q->nb_snapshots; i++) {
		unsigned long long v = strtoull(q->snaps[i].id, NULL, 10);

		if (v > maxid)
			maxid = v;
	}
	snprintf(idbuf, sizeof(idbuf), "%llu", (unsigned long long)maxid + 1);

	/* 1. the active tables gain a reference; COPIED flags go */
	if ((r = qcow2_update_l1_refs(d, q->l1, q->l1_size, 1, 1)) < 0)
		return r;
	/* 2. a copy of the active L1 table */
	if (q->l1_size) {
		nc = ((uint64_t)q->l1_size * 8 + q->cs - 1) >> q->cluster_bits;
		if ((buf = calloc(nc, q->cs)) == NULL)
			return vdsk_error(ENOMEM, "out of memory");
		for (i = 0; i < q->l1_size; i++)
			be64_put(buf + i * 8, q->l1[i] & ~OFLAG_COPIED);
		r = qcow2_alloc_clusters(d, nc, &l1off);
		if (r == 0)
			r = vdsk_pwrite(d, buf, nc * q->cs, l1off,
			    "snapshot L1 table");
		free(buf);
		if (r < 0)
			return r;
	}
	/* 3. the new table */
	nsn = calloc(q->nb_snapshots + 1, sizeof(*nsn));
	if (nsn == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	if (q->nb_snapshots)
		memcpy(nsn, q->snaps, q->nb_snapshots * sizeof(*nsn));
	s = &nsn[q->nb_snapshots];
	clock_gettime(CLOCK_REALTIME, &ts);
	s->l1_off = l1off;
	s->l1_size = q->l1_size;
	s->date_sec = (uint32_t)ts.tv_sec;
	s->date_nsec = (uint32_t)ts.tv_nsec;
	s->disk_size = d->size;
	s->extra_size = SN_EXTRA_NEW;
	s->id = strdup(idbuf);
	s->name = strdup(name);
	s->extra = calloc(1, SN_EXTRA_NEW);
	if (s->id == NULL || s->name == NULL || s->extra == NULL) {
		free(s->id);
		free(s->name);
		free(s->extra);
		free(nsn);
		return vdsk_error(ENOMEM, "out of memory");
	}
	be64_put(s->extra + 8, d->size);
	be64_put(s->extra + 16, UINT64_MAX);    /* no icount */
	if ((r = snap_write(d, nsn, q->nb_snapshots + 1)) < 0) {
		free(s->id);
		free(s->name);
		free(s->extra);
		free(nsn);
		return r;
	}
	free(q->snaps);
	q->snaps = nsn;
	q->nb_snapshots++;
	return qcow2_flush(d);
}

static int
load_snap_l1(struct vdsk *d, struct qsnap *s, uint64_t **l1)
{
	return qcow2_load_table(d, s->l1_off, s->l1_size, l1,
	    "snapshot L1 table");
}

static int
snap_delete(struct vdsk *d, int idx)
{
	struct qcow2 *q = d->priv;
	struct qsnap s = q->snaps[idx];
	uint64_t *l1 = NULL;
	int r;

	if ((r = load_snap_l1(d, &s, &l1)) < 0)
		return r;
	memmove(&q->snaps[idx], &q->snaps[idx + 1],
	    (q->nb_snapshots - (uint32_t)idx - 1) * sizeof(s));
	if ((r = snap_write(d, q->snaps, q->nb_snapshots - 1)) < 0) {
		memmove(&q->snaps[idx + 1], &q->snaps[idx],
		    (q->nb_snapshots - (uint32_t)idx - 1) * sizeof(s));
		q->snaps[idx] = s;
		free(l1);
		return r;
	}
	q->nb_snapshots--;
	free(s.id);
	free(s.name);
	free(s.extra);
	r = qcow2_update_l1_refs(d, l1, s.l1_size, -1, 0);
	free(l1);
	if (r == 0 && s.l1_size)
		r = qcow2_update_refcount(d, s.l1_off, (uint64_t)s.l1_size * 8,
		    -1);
	if (r == 0)
		r = qcow2_update_l1_refs(d, q->l1, q->l1_size, 0, 1);
	if (r == 0)
		r = qcow2_flush(d);
	return r;
}

static int
snap_apply(struct vdsk *d, int idx)
{
	struct qcow2 *q = d->priv;
	struct qsnap *s = &q->snaps[idx];
	uint64_t *sl1 = NULL, *old = NULL, i, nc;
	uint8_t *buf, h[8];
	int r;

	if (d->size < s->disk_size && (r = qcow2_grow(d, s->disk_size)) < 0)
		return r;
	if ((r = load_snap_l1(d, s, &sl1)) < 0)
		return r;
	for (i = q->l1_size; i < s->l1_size; i++)
		if (sl1[i] != 0) {
			free(sl1);
			return vdsk_error(EINVAL, "%s: snapshot %s maps data "
			    "beyond its size", d->path, s->id);
		}
	r = qcow2_update_l1_refs(d, sl1, s->l1_size, 1, 0);
	nc = ((uint64_t)q->l1_size * 8 + q->cs - 1) >> q->cluster_bits;
	if (r == 0 && ((old = malloc((size_t)q->l1_size * 8 + 1)) == NULL ||
	    (buf = calloc(nc, q->cs)) == NULL))
		r = vdsk_error(ENOMEM, "out of memory");
	if (r < 0) {
		free(sl1);
		free(old);
		return r;
	}
	memcpy(old, q->l1, (size_t)q->l1_size * 8);
	for (i = 0; i < q->l1_size; i++) {
		q->l1[i] = i < s->l1_size ? sl1[i] & ~OFLAG_COPIED : 0;
		be64_put(buf + i * 8, q->l1[i]);
	}
	free(sl1);
	if (q->l1_size)
		r = vdsk_pwrite(d, buf, (size_t)q->l1_size * 8, q->l1_offset,
		    "L1 table");
	free(buf);
	if (r == 0)
		r = qcow2_flush(d);
	if (r == 0)
		r = qcow2_update_l1_refs(d, old, q->l1_size, -1, 0);
	free(old);
	if (r == 0)
		r = qcow2_update_l1_refs(d, q->l1, q->l1_size, 0, 1);
	if (r == 0 && s->disk_size != d->size) {
		be64_put(h, s->disk_size);
		r = vdsk_pwrite(d, h, 8, 24, "header");
		if (r == 0)
			d->size = s->disk_size;
	}
	q->dbuf_entry = 0;
	if (r == 0)
		r = qcow2_flush(d);
	return r;
}

int
qcow2_snapshot(struct vdsk *d, int op, const char *name,
    struct vdsk_snapshot *out, int max)
{
	struct qcow2 *q = d->priv;
	uint32_t i;
	int idx;

	if (op == VDSK_SNAP_LIST) {
		for (i = 0; i < q->nb_snapshots && (int)i < max; i++) {
			struct qsnap *s = &q->snaps[i];

			memset(&out[i], 0, sizeof(out[i]));
			snprintf(out[i].id, sizeof(out[i].id), "%s", s->id);
			snprintf(out[i].name, sizeof(out[i].name), "%s",
			    s->name);
			out[i].vm_state_size = s->vm_state_size;
			if (s->extra_size >= 8)
				out[i].vm_state_size = be64_get(s->extra);
			out[i].disk_size = s->disk_size;
			out[i].date_sec = s->date_sec;
			out[i].date_nsec = s->date_nsec;
			out[i].vm_clock_nsec = s->vm_clock;
		}
		return (int)q->nb_snapshots;
	}
	if (q->extl2)
		return vdsk_error(ENOTSUP, "%s: snapshots of extended L2 "
		    "images are not supported", d->path);
	if (op == VDSK_SNAP_CREATE)
		return snap_create(d, name);
	if ((idx = find(q, name)) < 0)
		return vdsk_error(ENOENT, "%s: no snapshot '%s'", d->path,
		    name);
	if (op == VDSK_SNAP_APPLY)
		return snap_apply(d, idx);
	if (op == VDSK_SNAP_DELETE)
		return snap_delete(d, idx);
	return vdsk_error(EINVAL, "bad snapshot op %d", op);
}
