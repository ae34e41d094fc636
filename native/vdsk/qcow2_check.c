/*
 * libvdsk qcow2: consistency check like qemu-img check.  The expected
 * refcount of every host cluster is computed from the header, the L1/L2
 * tables (active and snapshots), the snapshot table and the refcount
 * structures, then compared with the stored refcounts: stored > expected
 * is a leak, stored < expected a corruption.  Leaks can be repaired
 * (and, internally, corruptions too, to recover dirty images).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"

struct ck {
	struct vdsk *d;
	struct qcow2 *q;
	struct vdsk_check *res;
	uint32_t *ref;
	uint64_t n;             /* clusters in the file */
	uint8_t *tab;
	uint64_t copied;        /* OFLAG_COPIED mismatches */
};

static void
report(struct ck *c, const char *fmt, unsigned long long a,
    unsigned long long b)
{
	c->res->corruptions++;
	if (getenv("VDSK_CHECK_VERBOSE") != NULL) {
		fprintf(stderr, fmt, a, b);
		fputc('\n', stderr);
	}
}

static void
inc(struct ck *c, uint64_t off, uint64_t len)
{
	uint64_t cl, end;

	if (len == 0)
		return;
	end = (off + len - 1) >> c->q->cluster_bits;
	for (cl = off >> c->q->cluster_bits; cl <= end; cl++) {
		if (cl >= c->n) {
			report(c, "ERROR: cluster %#llx beyond the end of the "
			    "file (%llu)", cl << c->q->cluster_bits, c->n);
			continue;
		}
		if (c->ref[cl] != UINT32_MAX)
			c->ref[cl]++;
	}
}

static int
check_l1(struct ck *c, uint64_t l1off, uint64_t *l1, uint32_t l1_size,
    int active)
{
	struct qcow2 *q = c->q;
	uint64_t l2o, e, o, l, rc, i, j;
	enum ckind k;
	int r;

	inc(c, l1off, (uint64_t)l1_size * 8);
	for (i = 0; i < l1_size; i++) {
		l2o = l1[i] & L1E_OFFSET_MASK;
		if (l2o == 0)
			continue;
		if ((l1[i] & L1E_RESERVED) || (l2o & (q->cs - 1)) ||
		    l2o >= c->n << q->cluster_bits) {
			report(c, "ERROR: invalid L1 entry %llu (%#llx)", i,
			    l1[i]);
			continue;
		}
		inc(c, l2o, q->cs);
		if (active) {
			if ((r = qcow2_get_refcount(c->d, l2o, &rc)) < 0)
				rc = 0;
			if ((rc == 1) != ((l1[i] & OFLAG_COPIED) != 0) &&
			    ++c->copied)
				report(c, "ERROR: OFLAG_COPIED L2 table %#llx "
				    "refcount %llu", l2o, rc);
		}
		if ((r = vdsk_pread(c->d, c->tab, q->cs, l2o, "L2 table")) < 0)
			return r;
		for (j = 0; j < q->cs; j += q->l2e_size) {
			e = be64_get(c->tab + j);
			if (qcow2_entry_kind(c->d, e, &k) < 0) {
				report(c, "ERROR: invalid L2 entry %llu (%#llx)",
				    j / q->l2e_size, e);
				continue;
			}
			qcow2_entry_range(q, e, &o, &l);
			if (l == 0)
				continue;
			if (active)
				c->res->allocated_clusters++;
			inc(c, o, l);
			if (!active || k == C_COMPRESSED)
				continue;
			if ((r = qcow2_get_refcount(c->d, o, &rc)) < 0)
				rc = 0;
			if ((rc == 1) != ((e & OFLAG_COPIED) != 0) &&
			    ++c->copied)
				report(c, "ERROR: OFLAG_COPIED data cluster "
				    "%#llx refcount %llu", o, rc);
		}
	}
	return 0;
}

int
qcow2_check(struct vdsk *d, int flags, struct vdsk_check *res)
{
	struct qcow2 *q = d->priv;
	struct ck c;
	uint64_t i, rbo, stored, *l1;
	int r = 0, fix_leaks, fix_all;

	memset(res, 0, sizeof(*res));
	memset(&c, 0, sizeof(c));
	c.d = d;
	c.q = q;
	c.res = res;
	fix_all = (flags & QCOW2_CHECK_REPAIR_ALL) != 0;
	fix_leaks = fix_all || (flags & VDSK_CHECK_REPAIR_LEAKS);
	if ((r = qcow2_load_rt(d)) < 0)
		return r;
	c.n = (d->file_size + q->cs - 1) >> q->cluster_bits;
	if (q->next_free > c.n << q->cluster_bits)
		c.n = q->next_free >> q->cluster_bits;
	if (c.n > (1ULL << 32))
		return vdsk_error(EFBIG, "%s: image file too large to check",
		    d->path);
	res->total_clusters = (d->size + q->cs - 1) >> q->cluster_bits;
	c.ref = calloc(c.n ? c.n : 1, sizeof(*c.ref));
	c.tab = malloc(q->cs);
	if (c.ref == NULL || c.tab == NULL) {
		r = vdsk_error(ENOMEM, "out of memory");
		goto out;
	}
	inc(&c, 0, q->cs);
	if ((r = check_l1(&c, q->l1_offset, q->l1, q->l1_size, 1)) < 0)
		goto out;
	inc(&c, q->snap_off, q->snap_bytes);
	for (i = 0; i < q->nb_snapshots; i++) {
		struct qsnap *s = &q->snaps[i];

		if ((r = qcow2_load_table(d, s->l1_off, s->l1_size, &l1,
		    "snapshot L1 table")) < 0) {
			report(&c, "ERROR: snapshot %llu L1 table at %#llx "
			    "unreadable", i, s->l1_off);
			r = 0;
			continue;
		}
		r = check_l1(&c, s->l1_off, l1, s->l1_size, 0);
		free(l1);
		if (r < 0)
			goto out;
	}
	inc(&c, q->rt_offset, (uint64_t)q->rt_clusters << q->cluster_bits);
	for (i = 0; i < q->rt_entries; i++) {
		rbo = q->rt[i] & RTE_OFFSET_MASK;
		if (q->rt[i] == 0)
			continue;
		if ((q->rt[i] & ~RTE_OFFSET_MASK) || (rbo & (q->cs - 1)) ||
		    rbo >= c.n << q->cluster_bits) {
			report(&c, "ERROR: refcount block %llu at %#llx is "
			    "invalid", i, q->rt[i]);
			continue;
		}
		inc(&c, rbo, q->cs);
	}
	for (i = 0; i < c.n; i++) {
		if ((r = qcow2_get_refcount(d, i << q->cluster_bits,
		    &stored)) < 0) {
			r = 0;
			/* already reported as an invalid refcount block */
			i |= (1ULL << q->rb_bits) - 1;
			continue;
		}
		if (stored == c.ref[i])
			continue;
		if (stored > c.ref[i]) {
			if (fix_leaks && qcow2_set_refcount(d,
			    i << q->cluster_bits, c.ref[i]) == 0) {
				res->leaks_fixed++;
				continue;
			}
			res->leaks++;
		} else {
			if (fix_all && qcow2_set_refcount(d,
			    i << q->cluster_bits, c.ref[i]) == 0) {
				res->corruptions_fixed++;
				continue;
			}
			report(&c, "ERROR: cluster %llu refcount=%llu is too "
			    "low", i, (unsigned long long)stored);
		}
	}
	if (fix_all && (res->corruptions_fixed || c.copied)) {
		/* refcounts are right now: recompute OFLAG_COPIED */
		r = qcow2_update_l1_refs(d, q->l1, q->l1_size, 0, 1);
		if (r == 0) {
			res->corruptions -= c.copied;
			res->corruptions_fixed += c.copied;
		}
	}
	if (fix_leaks && (res->leaks_fixed || res->corruptions_fixed) &&
	    r == 0)
		r = qcow2_flush(d);
out:
	free(c.ref);
	free(c.tab);
	return r;
}
