/*
 * libvdsk VMDK driver.
 *
 *   monolithicSparse  one hosted sparse extent ("KDMV" header, embedded
 *                     descriptor, grain directory + redundant GD, grain
 *                     tables): read, write, create (qemu-img's layout);
 *   streamOptimized   the same container with deflate-compressed grains
 *                     behind grain markers, GD possibly at the end of the
 *                     file (footer): read only;
 *   monolithicFlat    a descriptor file naming FLAT (and ZERO) extents:
 *                     read and write of the existing extents.
 *
 * Other createTypes are refused.  Extent files named by a descriptor must
 * be plain names in the descriptor's directory (no '/', no symlink): a
 * descriptor is untrusted input and must not open arbitrary host files.
 *
 * Sparse writes allocate whole grains at the end of the file, in the
 * order data -> GT entry -> redundant GT entry, so `qemu-img check` stays
 * clean and a crash leaks at most a grain.  Grain tables are never
 * allocated (qemu-img and VMware preallocate them all).
 *
 * Parsing of descriptors lives in vmdk_desc.c.
 */
#define _GNU_SOURCE
#include <sys/random.h>
#include <sys/stat.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#include "vdsk_impl.h"
#include "vmdk_impl.h"

#define SPARSE_MAGIC    0x564d444bu     /* "KDMV" little-endian */
#define HDR_LEN         512
#define GD_AT_END       0xffffffffffffffffULL
#define F_NL_TEST       (1u << 0)
#define F_RGD           (1u << 1)
#define F_ZERO_GRAIN    (1u << 2)
#define F_COMPRESSED    (1u << 16)
#define F_MARKERS       (1u << 17)
#define MAX_GTES        512
#define MAX_GRAIN_SECT  2048            /* 1 MiB grains */
#define MAX_DESC        (1u << 20)
#define MAX_SECTOR32    0xffffffffULL
#define GT_CACHE        16
#define MARKER_LEN      12

struct gtslot {
	uint64_t off;                   /* 0: empty */
	uint32_t *e;                    /* host-endian entries */
};

struct vmdk {
	int kind;
	/* sparse and stream */
	uint32_t version, flags;
	uint64_t grain;                 /* bytes */
	uint64_t grain_sect;
	uint32_t gtes;
	uint32_t gd_entries;
	uint64_t overhead;              /* sectors */
	uint32_t *gd, *rgd;             /* sector numbers of the (R)GTs */
	uint64_t next_sector;
	struct gtslot gtc[GT_CACHE];
	unsigned gtc_next;
	uint8_t *gbuf;                  /* one grain */
	uint8_t *zbuf;                  /* one compressed grain + marker */
	size_t zmax;
	uint64_t zgrain;                /* grain index cached in gbuf */
	/* flat */
	struct vmdk_desc desc;
};

/* ---- sparse header ---- */

static int
load_dir(struct vdsk *d, uint64_t sector, uint32_t n, uint32_t **out,
    const char *what)
{
	uint64_t off = sector * 512, bytes = (uint64_t)n * 4;
	uint32_t *t, i;
	int r;

	if (sector == 0 || sector > d->file_size / 512 ||
	    d->file_size - off < bytes)
		return vdsk_error(EINVAL, "%s: VMDK %s at sector %llu is "
		    "outside the file", d->path, what,
		    (unsigned long long)sector);
	if ((t = malloc(bytes ? bytes : 1)) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	if ((r = vdsk_pread(d, t, bytes, off, what)) < 0) {
		free(t);
		return r;
	}
	for (i = 0; i < n; i++)
		t[i] = le32_get((uint8_t *)&t[i]);
	*out = t;
	return 0;
}

static int
parse_header(struct vdsk *d, const uint8_t *h, uint64_t *gd_off,
    uint64_t *rgd_off)
{
	struct vmdk *v = d->priv;
	uint64_t cap, per_gt, n;

	if (le32_get(h) != SPARSE_MAGIC)
		return vdsk_error(EINVAL, "%s: not a VMDK sparse extent",
		    d->path);
	v->version = le32_get(h + 4);
	if (v->version < 1 || v->version > 3)
		return vdsk_error(ENOTSUP, "%s: unsupported VMDK version %u",
		    d->path, v->version);
	v->flags = le32_get(h + 8);
	cap = le64_get(h + 12);
	v->grain_sect = le64_get(h + 20);
	v->gtes = le32_get(h + 44);
	*rgd_off = le64_get(h + 48);
	*gd_off = le64_get(h + 56);
	v->overhead = le64_get(h + 64);
	if (cap > (uint64_t)INT64_MAX / 512)
		return vdsk_error(EFBIG, "%s: VMDK capacity too large", d->path);
	if (v->grain_sect == 0 || v->grain_sect > MAX_GRAIN_SECT ||
	    (v->grain_sect & (v->grain_sect - 1)) != 0)
		return vdsk_error(EINVAL, "%s: invalid VMDK grain size %llu "
		    "sectors", d->path, (unsigned long long)v->grain_sect);
	if (v->gtes == 0 || v->gtes > MAX_GTES)
		return vdsk_error(EINVAL, "%s: invalid VMDK grain table size "
		    "%u", d->path, v->gtes);
	if ((v->flags & F_COMPRESSED) && le16_get(h + 77) != 1)
		return vdsk_error(ENOTSUP, "%s: unsupported VMDK compression "
		    "algorithm %u", d->path, le16_get(h + 77));
	if ((v->flags & F_COMPRESSED) && !(v->flags & F_MARKERS))
		return vdsk_error(ENOTSUP, "%s: compressed VMDK without grain "
		    "markers is not supported", d->path);
	if ((v->flags & F_NL_TEST) && (h[73] != '\n' || h[74] != ' ' ||
	    h[75] != '\r' || h[76] != '\n'))
		return vdsk_error(EINVAL, "%s: VMDK header damaged by a "
		    "text-mode transfer", d->path);
	v->grain = v->grain_sect * 512;
	per_gt = (uint64_t)v->gtes * v->grain_sect;
	n = (cap + per_gt - 1) / per_gt;
	if (n > UINT32_MAX / 4)
		return vdsk_error(EFBIG, "%s: VMDK grain directory too large",
		    d->path);
	v->gd_entries = (uint32_t)n;
	d->size = cap * 512;
	return 0;
}

static int
read_descriptor_embedded(struct vdsk *d, const uint8_t *h)
{
	struct vmdk *v = d->priv;
	uint64_t off = le64_get(h + 28), len = le64_get(h + 36);
	char *text;
	int r;

	if (off == 0 || len == 0)
		return 0;
	if (len > MAX_DESC / 512 || off > d->file_size / 512 ||
	    d->file_size - off * 512 < len * 512)
		return vdsk_error(EINVAL, "%s: VMDK embedded descriptor out of "
		    "range", d->path);
	if ((text = malloc(len * 512 + 1)) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	r = vdsk_pread(d, text, len * 512, off * 512, "VMDK descriptor");
	if (r == 0) {
		text[len * 512] = '\0';
		r = vmdk_desc_parse(d, &v->desc, text, 1);
	}
	free(text);
	if (r < 0)
		return r;
	if (v->desc.create_type[0] == '\0')
		return 0;
	if (strcmp(v->desc.create_type, "monolithicSparse") != 0 &&
	    strcmp(v->desc.create_type, "streamOptimized") != 0)
		return vdsk_error(ENOTSUP, "%s: VMDK createType '%s' is not "
		    "supported (monolithicSparse, monolithicFlat, "
		    "streamOptimized)", d->path, v->desc.create_type);
	return 0;
}

static int
open_sparse(struct vdsk *d)
{
	struct vmdk *v = d->priv;
	uint8_t h[HDR_LEN];
	uint64_t gd_off, rgd_off;
	int r;

	if ((r = vdsk_pread(d, h, HDR_LEN, 0, "VMDK header")) < 0 ||
	    (r = parse_header(d, h, &gd_off, &rgd_off)) < 0 ||
	    (r = read_descriptor_embedded(d, h)) < 0)
		return r;
	if (gd_off == GD_AT_END) {
		/* streamOptimized: the real header is the footer */
		uint8_t f[HDR_LEN];

		if (!(v->flags & F_COMPRESSED) || d->file_size < 3 * HDR_LEN)
			return vdsk_error(EINVAL, "%s: VMDK grain directory at "
			    "the end but no footer", d->path);
		if ((r = vdsk_pread(d, f, HDR_LEN, d->file_size - 2 * HDR_LEN,
		    "VMDK footer")) < 0 ||
		    (r = parse_header(d, f, &gd_off, &rgd_off)) < 0)
			return r;
		if (gd_off == GD_AT_END || !(v->flags & F_COMPRESSED))
			return vdsk_error(EINVAL, "%s: invalid VMDK footer",
			    d->path);
	}
	v->kind = (v->flags & F_COMPRESSED) ? VMDK_STREAM : VMDK_SPARSE;
	if (v->kind == VMDK_STREAM && !(d->flags & VDSK_RDONLY))
		return vdsk_error(ENOTSUP, "%s: streamOptimized VMDK images "
		    "can only be opened read-only", d->path);
	if ((r = load_dir(d, gd_off, v->gd_entries, &v->gd,
	    "grain directory")) < 0)
		return r;
	if ((v->flags & F_RGD) && rgd_off != 0 && v->kind == VMDK_SPARSE &&
	    (r = load_dir(d, rgd_off, v->gd_entries, &v->rgd,
	    "redundant grain directory")) < 0)
		return r;
	if (v->kind == VMDK_SPARSE && !(d->flags & VDSK_RDONLY) &&
	    (v->overhead == 0 || v->overhead > d->file_size / 512 + 1))
		return vdsk_error(EINVAL, "%s: invalid VMDK grain offset %llu",
		    d->path, (unsigned long long)v->overhead);
	v->next_sector = (d->file_size + 511) / 512;
	if (v->next_sector < v->overhead)
		v->next_sector = v->overhead;
	if ((v->gbuf = malloc(v->grain)) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	v->zgrain = UINT64_MAX;
	if (v->kind == VMDK_STREAM) {
		v->zmax = compressBound((uLong)v->grain) + MARKER_LEN + 512;
		if ((v->zbuf = malloc(v->zmax)) == NULL)
			return vdsk_error(ENOMEM, "out of memory");
	}
	if (v->desc.parent[0] != '\0') {
		snprintf(d->backing_file, sizeof(d->backing_file), "%s",
		    v->desc.parent);
		snprintf(d->backing_fmt, sizeof(d->backing_fmt), "vmdk");
	}
	return 0;
}

/* ---- grain tables ---- */

static int
gt_get(struct vdsk *d, uint64_t sector, uint32_t **out)
{
	struct vmdk *v = d->priv;
	struct gtslot *s;
	uint64_t off = sector * 512, bytes = (uint64_t)v->gtes * 4;
	unsigned i;
	int r;

	for (i = 0; i < GT_CACHE; i++) {
		if (v->gtc[i].off == off && off != 0) {
			*out = v->gtc[i].e;
			return 0;
		}
	}
	if (sector > d->file_size / 512 || d->file_size - off < bytes)
		return vdsk_error(EINVAL, "%s: VMDK grain table at sector %llu "
		    "is outside the file", d->path,
		    (unsigned long long)sector);
	s = &v->gtc[v->gtc_next];
	v->gtc_next = (v->gtc_next + 1) % GT_CACHE;
	if (s->e == NULL && (s->e = malloc(bytes)) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	s->off = 0;
	if ((r = vdsk_pread(d, s->e, bytes, off, "VMDK grain table")) < 0)
		return r;
	for (i = 0; i < v->gtes; i++)
		s->e[i] = le32_get((uint8_t *)&s->e[i]);
	s->off = off;
	*out = s->e;
	return 0;
}

enum { G_UNALLOC, G_ZERO, G_DATA };

/* Find grain g: its kind and, for data, its sector; *gt and *gi locate
 * the entry (gt NULL when the whole grain table is missing). */
static int
grain_lookup(struct vdsk *d, uint64_t g, int *kind, uint64_t *sector,
    uint32_t **gt, uint32_t *gi)
{
	struct vmdk *v = d->priv;
	uint64_t gdi = g / v->gtes;
	uint32_t e;
	int r;

	*gt = NULL;
	*gi = (uint32_t)(g % v->gtes);
	*kind = G_UNALLOC;
	if (gdi >= v->gd_entries || v->gd[gdi] == 0)
		return 0;
	if ((r = gt_get(d, v->gd[gdi], gt)) < 0)
		return r;
	e = (*gt)[*gi];
	if (e == 0)
		return 0;
	if (e == 1 && (v->flags & F_ZERO_GRAIN)) {
		*kind = G_ZERO;
		return 0;
	}
	if (v->kind == VMDK_SPARSE && e < v->overhead)
		return vdsk_error(EINVAL, "%s: VMDK grain %llu points into the "
		    "metadata (sector %u)", d->path, (unsigned long long)g, e);
	*kind = G_DATA;
	*sector = e;
	return 0;
}

static int
read_compressed(struct vdsk *d, uint64_t g, uint64_t sector)
{
	struct vmdk *v = d->priv;
	uint64_t off = sector * 512, avail;
	uint32_t zlen;
	uLongf out = (uLongf)v->grain;
	size_t first;
	int r;

	if (v->zgrain == g)
		return 0;
	v->zgrain = UINT64_MAX;
	if (off >= d->file_size || d->file_size - off < MARKER_LEN)
		return vdsk_error(EINVAL, "%s: VMDK compressed grain %llu is "
		    "outside the file", d->path, (unsigned long long)g);
	avail = d->file_size - off;
	first = avail < v->zmax ? (size_t)avail : v->zmax;
	if ((r = vdsk_pread(d, v->zbuf, first, off, "VMDK grain")) < 0)
		return r;
	zlen = le32_get(v->zbuf + 8);
	if (zlen == 0 || zlen > first - MARKER_LEN)
		return vdsk_error(EINVAL, "%s: VMDK compressed grain %llu has "
		    "a bad length %u", d->path, (unsigned long long)g, zlen);
	r = uncompress(v->gbuf, &out, v->zbuf + MARKER_LEN, zlen);
	if (r != Z_OK)
		return vdsk_error(EINVAL, "%s: VMDK compressed grain %llu does "
		    "not inflate (zlib error %d)", d->path,
		    (unsigned long long)g, r);
	memset(v->gbuf + out, 0, v->grain - out);
	v->zgrain = g;
	return 0;
}

static int
sparse_read(struct vdsk *d, uint8_t *p, uint64_t off, size_t len)
{
	struct vmdk *v = d->priv;
	uint32_t *gt, gi;
	int kind, r;

	while (len > 0) {
		uint64_t g = off / v->grain, sector = 0;
		uint64_t in = off % v->grain;
		size_t n = v->grain - in < len ? (size_t)(v->grain - in) : len;

		if ((r = grain_lookup(d, g, &kind, &sector, &gt, &gi)) < 0)
			return r;
		if (kind == G_ZERO) {
			memset(p, 0, n);
		} else if (kind == G_UNALLOC) {
			if ((r = vdsk_read_backing(d, p, off, n)) < 0)
				return r;
		} else if (v->kind == VMDK_STREAM) {
			if ((r = read_compressed(d, g, sector)) < 0)
				return r;
			memcpy(p, v->gbuf + in, n);
		} else if ((r = vdsk_pread(d, p, n, sector * 512 + in,
		    "data")) < 0) {
			return r;
		}
		p += n;
		off += n;
		len -= n;
	}
	return 0;
}

/* Allocate grain g at the end of the file with buf's bytes at 'in'. */
static int
grain_alloc(struct vdsk *d, uint64_t g, int kind, const uint8_t *buf,
    uint64_t in, size_t n, uint32_t *gt, uint32_t gi)
{
	struct vmdk *v = d->priv;
	uint64_t gstart = g * v->grain, sector = v->next_sector;
	uint64_t gdi = g / v->gtes;
	size_t head = v->grain;
	uint8_t e[4];
	int r;

	if (sector + v->grain_sect > MAX_SECTOR32)
		return vdsk_error(EFBIG, "%s: VMDK file is full (2 TiB)",
		    d->path);
	if (gstart + head > d->size)
		head = (size_t)(d->size - gstart);
	memset(v->gbuf, 0, v->grain);
	if (kind == G_UNALLOC && n < v->grain &&
	    (r = vdsk_read_backing(d, v->gbuf, gstart, head)) < 0)
		return r;
	memcpy(v->gbuf + in, buf, n);
	v->zgrain = UINT64_MAX;
	if ((r = vdsk_pwrite(d, v->gbuf, v->grain, sector * 512, "data")) < 0)
		return r;
	le32_put(e, (uint32_t)sector);
	if ((r = vdsk_pwrite(d, e, 4, (uint64_t)v->gd[gdi] * 512 +
	    (uint64_t)gi * 4, "VMDK grain table")) < 0)
		return r;
	gt[gi] = (uint32_t)sector;
	if (v->rgd != NULL && v->rgd[gdi] != 0 &&
	    (r = vdsk_pwrite(d, e, 4, (uint64_t)v->rgd[gdi] * 512 +
	    (uint64_t)gi * 4, "VMDK redundant grain table")) < 0)
		return r;
	v->next_sector = sector + v->grain_sect;
	return 0;
}

static int
sparse_write(struct vdsk *d, const uint8_t *p, uint64_t off, size_t len)
{
	struct vmdk *v = d->priv;
	uint32_t *gt, gi;
	int kind, r;

	while (len > 0) {
		uint64_t g = off / v->grain, sector = 0;
		uint64_t in = off % v->grain;
		size_t n = v->grain - in < len ? (size_t)(v->grain - in) : len;

		if ((r = grain_lookup(d, g, &kind, &sector, &gt, &gi)) < 0)
			return r;
		if (kind == G_DATA)
			r = vdsk_pwrite(d, p, n, sector * 512 + in, "data");
		else if (gt == NULL)
			r = vdsk_error(ENOTSUP, "%s: VMDK grain table for grain "
			    "%llu is not allocated", d->path,
			    (unsigned long long)g);
		else
			r = grain_alloc(d, g, kind, p, in, n, gt, gi);
		if (r < 0)
			return r;
		p += n;
		off += n;
		len -= n;
	}
	return 0;
}

/* ---- ops ---- */

static int
vmdk_open(struct vdsk *d)
{
	struct vmdk *v;
	uint8_t magic[4];
	int r;

	if ((v = calloc(1, sizeof(*v))) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	d->priv = v;
	if (d->file_size < 4)
		return vdsk_error(EINVAL, "%s: file too small for VMDK",
		    d->path);
	if ((r = vdsk_pread(d, magic, 4, 0, "VMDK magic")) < 0)
		return r;
	if (le32_get(magic) == SPARSE_MAGIC)
		return open_sparse(d);
	v->kind = VMDK_FLAT;
	return vmdk_desc_open(d, &v->desc, MAX_DESC);
}

static void
vmdk_close(struct vdsk *d)
{
	struct vmdk *v = d->priv;
	unsigned i;

	vmdk_desc_free(&v->desc);
	for (i = 0; i < GT_CACHE; i++)
		free(v->gtc[i].e);
	free(v->gd);
	free(v->rgd);
	free(v->gbuf);
	free(v->zbuf);
	free(v);
	d->priv = NULL;
}

static int
vmdk_read(struct vdsk *d, void *buf, uint64_t off, size_t len)
{
	struct vmdk *v = d->priv;

	if (v->kind == VMDK_FLAT)
		return vmdk_desc_io(d, &v->desc, buf, off, len, 0);
	return sparse_read(d, buf, off, len);
}

static int
vmdk_write(struct vdsk *d, const void *buf, uint64_t off, size_t len)
{
	struct vmdk *v = d->priv;

	if (v->kind == VMDK_FLAT)
		return vmdk_desc_io(d, &v->desc, (void *)buf, off, len, 1);
	return sparse_write(d, buf, off, len);
}

static int
vmdk_flush(struct vdsk *d)
{
	struct vmdk *v = d->priv;

	if (v->kind == VMDK_FLAT)
		return vmdk_desc_flush(d, &v->desc);
	if (fsync(d->fd) < 0)
		return vdsk_error(errno, "%s: fsync: %s", d->path,
		    strerror(errno));
	return 0;
}

static void
vmdk_info(struct vdsk *d, struct vdsk_info *info)
{
	struct vmdk *v = d->priv;

	if (v->kind != VMDK_FLAT) {
		info->cluster_size = (uint32_t)v->grain;
		info->version = v->version;
	}
}

/* ---- create (monolithicSparse, qemu-img's layout) ---- */

#define C_GRAIN_SECT    128
#define C_GTES          512
#define C_DESC_OFF      1
#define C_DESC_SECT     20

static int
write_desc(char *buf, size_t len, const char *path, uint64_t cap)
{
	const char *base = strrchr(path, '/');
	uint32_t cid;
	uint64_t cyl = cap / (16 * 63);
	int n;

	base = base ? base + 1 : path;
	if (strchr(base, '"') != NULL || strchr(base, '\n') != NULL)
		return -1;
	if (getrandom(&cid, sizeof(cid), 0) != sizeof(cid))
		cid = (uint32_t)cap ^ 0x5eed;
	if (cyl > 16383)
		cyl = 16383;
	n = snprintf(buf, len,
	    "# Disk DescriptorFile\nversion=1\nCID=%08x\nparentCID=ffffffff\n"
	    "createType=\"monolithicSparse\"\n\n# Extent description\n"
	    "RW %llu SPARSE \"%s\"\n\n# The Disk Data Base\n#DDB\n\n"
	    "ddb.virtualHWVersion = \"4\"\n"
	    "ddb.geometry.cylinders = \"%llu\"\n"
	    "ddb.geometry.heads = \"16\"\nddb.geometry.sectors = \"63\"\n"
	    "ddb.adapterType = \"ide\"\n", cid, (unsigned long long)cap, base,
	    (unsigned long long)cyl);
	return n < 0 || (size_t)n >= len ? -1 : 0;
}

static int
vmdk_create_sparse(const char *path, uint64_t size)
{
	struct vdsk tmp = { .path = (char *)path };
	uint64_t cap = (size + 511) / 512;
	uint64_t grains, gts, gd_sect, gt_sect, rgd, gd, overhead, i;
	uint8_t h[HDR_LEN], *dir = NULL;
	char desc[C_DESC_SECT * 512];
	int r = 0;

	grains = (cap + C_GRAIN_SECT - 1) / C_GRAIN_SECT;
	gts = (grains + C_GTES - 1) / C_GTES;
	gd_sect = (gts * 4 + 511) / 512;
	gt_sect = C_GTES * 4 / 512;
	rgd = C_DESC_OFF + C_DESC_SECT;
	gd = rgd + gd_sect + gt_sect * gts;
	overhead = gd + gd_sect + gt_sect * gts;
	overhead = (overhead + C_GRAIN_SECT - 1) / C_GRAIN_SECT * C_GRAIN_SECT;
	if (overhead + grains * C_GRAIN_SECT > MAX_SECTOR32)
		return vdsk_error(EFBIG, "%s: size too large for VMDK (about "
		    "2 TiB at most)", path);
	memset(desc, 0, sizeof(desc));
	if (write_desc(desc, sizeof(desc), path, cap) < 0)
		return vdsk_error(EINVAL, "%s: unusable VMDK file name", path);

	memset(h, 0, sizeof(h));
	le32_put(h, SPARSE_MAGIC);
	le32_put(h + 4, 1);
	le32_put(h + 8, F_NL_TEST | F_RGD);
	le64_put(h + 12, cap);
	le64_put(h + 20, C_GRAIN_SECT);
	le64_put(h + 28, C_DESC_OFF);
	le64_put(h + 36, C_DESC_SECT);
	le32_put(h + 44, C_GTES);
	le64_put(h + 48, rgd);
	le64_put(h + 56, gd);
	le64_put(h + 64, overhead);
	h[73] = '\n';
	h[74] = ' ';
	h[75] = '\r';
	h[76] = '\n';

	if ((dir = calloc(gd_sect ? gd_sect : 1, 512)) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	tmp.fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (tmp.fd < 0) {
		free(dir);
		return vdsk_error(errno, "%s: %s", path, strerror(errno));
	}
	if (ftruncate(tmp.fd, (off_t)(overhead * 512)) < 0)
		r = vdsk_error(errno, "%s: truncate: %s", path,
		    strerror(errno));
	if (r == 0)
		r = vdsk_pwrite(&tmp, h, sizeof(h), 0, "VMDK header");
	if (r == 0)
		r = vdsk_pwrite(&tmp, desc, sizeof(desc), C_DESC_OFF * 512,
		    "VMDK descriptor");
	for (i = 0; i < gts; i++)
		le32_put(dir + i * 4, (uint32_t)(rgd + gd_sect + i * gt_sect));
	if (r == 0 && gd_sect)
		r = vdsk_pwrite(&tmp, dir, gd_sect * 512, rgd * 512,
		    "VMDK redundant grain directory");
	for (i = 0; i < gts; i++)
		le32_put(dir + i * 4, (uint32_t)(gd + gd_sect + i * gt_sect));
	if (r == 0 && gd_sect)
		r = vdsk_pwrite(&tmp, dir, gd_sect * 512, gd * 512,
		    "VMDK grain directory");
	free(dir);
	if (close(tmp.fd) < 0 && r == 0)
		r = vdsk_error(errno, "%s: close: %s", path, strerror(errno));
	return r;
}

static int
vmdk_create(const char *path, uint64_t size, const char *backing,
    const char *backing_fmt, uint32_t cluster_size, const char *subformat)
{
	(void)backing_fmt;
	if (backing != NULL)
		return vdsk_error(ENOTSUP, "%s: creating VMDK images with a "
		    "backing file is not supported", path);
	if (cluster_size != 0 && cluster_size != C_GRAIN_SECT * 512)
		return vdsk_error(EINVAL, "%s: VMDK grain size must be 64 KiB",
		    path);
	if (subformat != NULL && strcmp(subformat, "monolithicSparse") != 0)
		return vdsk_error(ENOTSUP, "%s: cannot create VMDK subformat "
		    "'%s' (only monolithicSparse)", path, subformat);
	return vmdk_create_sparse(path, size);
}

static int
vmdk_create_default(const char *path, uint64_t size, const char *backing,
    const char *backing_fmt, uint32_t cluster_size)
{
	return vmdk_create(path, size, backing, backing_fmt, cluster_size,
	    NULL);
}

const struct vdsk_ops vdsk_vmdk_ops = {
	.name = "vmdk",
	.open = vmdk_open,
	.close = vmdk_close,
	.read = vmdk_read,
	.write = vmdk_write,
	.flush = vmdk_flush,
	.create = vmdk_create_default,
	.info = vmdk_info,
	.create_subformat = vmdk_create,
};
