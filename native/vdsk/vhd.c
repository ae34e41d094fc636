/*
 * libvdsk VHD driver (QEMU calls the format "vpc"): fixed and dynamic
 * disks, read, write, create.  Differencing disks are refused.
 *
 * On disk (all big-endian): a 512-byte footer ("conectix") at the end of
 * the file; dynamic disks also keep a copy of it at offset 0, a 1 KiB
 * dynamic header ("cxsparse") and the block allocation table (BAT: one
 * 32-bit sector number per block, 0xffffffff = not allocated).  A block
 * is a sector bitmap followed by block_size bytes of data.
 *
 * Compatibility with QEMU (block/vpc.c), deliberately:
 *  - the virtual size is the CHS geometry (cylinders*heads*sectors*512)
 *    unless the creator application is one known to use the footer's
 *    current_size ("win ", "qem2", "d2v ", "CTXS", "tap\0") or the
 *    geometry is the maximum 65535/16/255;
 *  - create rounds the size up to a sector and then up to the next size
 *    a CHS geometry can express (qemu-img create -f vpc with its default
 *    force_size=off), so e.g. 10 MiB becomes 10514432 bytes; sizes of
 *    127 GiB and more get the maximum geometry and keep the exact size;
 *  - new blocks get an all-ones sector bitmap and the bitmap of a block
 *    is set to all ones before it is written, so bitmaps never hide data
 *    (reads, like QEMU's, take the block data as it is);
 *  - a fixed disk has no header at offset 0, so probing sees raw (as with
 *    qemu-img); open it with the format "vpc".
 * Footer and dynamic header checksums are verified on open.
 */
#define _GNU_SOURCE
#include <sys/random.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "vdsk_impl.h"

#define FOOTER_LEN      512
#define DYNHDR_LEN      1024
#define TYPE_FIXED      2
#define TYPE_DYNAMIC    3
#define TYPE_DIFF       4
#define BAT_FREE        0xffffffffu
#define MAX_SECTORS     0xff000000ULL           /* 2040 GiB */
#define MAX_GEOMETRY    (65535ULL * 16 * 255)
#define MAX_BLOCK       (1u << 30)
#define DEF_BLOCK       (2u << 20)
#define EPOCH_2000      946684800

struct vhd {
	int type;
	uint8_t footer[FOOTER_LEN];
	uint32_t block_size;
	uint32_t bitmap_size;
	uint32_t entries;
	uint32_t *bat;
	uint64_t bat_offset;
	uint64_t next_free;             /* where the next block goes */
	uint64_t last_bitmap;           /* bitmap known to be all ones */
};

static uint32_t
vhd_checksum(const uint8_t *b, size_t len, size_t skip)
{
	uint32_t sum = 0;
	size_t i;

	for (i = 0; i < len; i++)
		if (i < skip || i >= skip + 4)
			sum += b[i];
	return ~sum;
}

/* qemu's calculate_geometry(): the VHD specification's algorithm. */
static void
chs_of(uint64_t sectors, uint16_t *c, uint8_t *h, uint8_t *s)
{
	uint32_t cth;

	if (sectors > MAX_GEOMETRY)
		sectors = MAX_GEOMETRY;
	if (sectors >= 65535ULL * 16 * 63) {
		*s = 255;
		*h = 16;
		cth = (uint32_t)(sectors / 255);
	} else {
		*s = 17;
		cth = (uint32_t)(sectors / 17);
		*h = (uint8_t)((cth + 1023) / 1024);
		if (*h < 4)
			*h = 4;
		if (cth >= (uint32_t)*h * 1024 || *h > 16) {
			*s = 31;
			*h = 16;
			cth = (uint32_t)(sectors / 31);
		}
		if (cth >= (uint32_t)*h * 1024) {
			*s = 63;
			*h = 16;
			cth = (uint32_t)(sectors / 63);
		}
	}
	*c = (uint16_t)(cth / *h);
}

static int
uses_current_size(const uint8_t *app)
{
	static const char *apps[] = { "win ", "qem2", "d2v ", "CTXS" };
	size_t i;

	for (i = 0; i < sizeof(apps) / sizeof(apps[0]); i++)
		if (memcmp(app, apps[i], 4) == 0)
			return 1;
	return memcmp(app, "tap\0", 4) == 0;
}

static int
vhd_open(struct vdsk *d)
{
	struct vhd *v;
	uint8_t dh[DYNHDR_LEN];
	uint64_t chs, bat_bytes, dataoff, end;
	uint32_t i;
	int r;

	if ((v = calloc(1, sizeof(*v))) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	d->priv = v;
	v->last_bitmap = UINT64_MAX;
	if (d->file_size < FOOTER_LEN)
		return vdsk_error(EINVAL, "%s: file too small for a VHD footer",
		    d->path);
	r = vdsk_pread(d, v->footer, FOOTER_LEN, 0, "VHD footer copy");
	if (r < 0)
		return r;
	v->type = TYPE_DYNAMIC;
	if (memcmp(v->footer, "conectix", 8) != 0) {
		r = vdsk_pread(d, v->footer, FOOTER_LEN,
		    d->file_size - FOOTER_LEN, "VHD footer");
		if (r < 0)
			return r;
		if (memcmp(v->footer, "conectix", 8) != 0)
			return vdsk_error(EINVAL, "%s: not a VHD image (no "
			    "footer)", d->path);
		v->type = TYPE_FIXED;
	}
	if (vhd_checksum(v->footer, FOOTER_LEN, 64) != be32_get(v->footer + 64))
		return vdsk_error(EINVAL, "%s: VHD footer checksum mismatch",
		    d->path);
	i = be32_get(v->footer + 60);
	if (i == TYPE_DIFF)
		return vdsk_error(ENOTSUP, "%s: differencing VHD images are "
		    "not supported", d->path);
	if (i != TYPE_FIXED && i != TYPE_DYNAMIC)
		return vdsk_error(EINVAL, "%s: unknown VHD disk type %u",
		    d->path, i);
	if ((i == TYPE_FIXED) != (v->type == TYPE_FIXED))
		return vdsk_error(EINVAL, "%s: VHD disk type %u does not match "
		    "the footer placement", d->path, i);

	chs = (uint64_t)be16_get(v->footer + 56) * v->footer[58] *
	    v->footer[59];
	if (uses_current_size(v->footer + 28) || chs == MAX_GEOMETRY)
		chs = be64_get(v->footer + 48) / 512;
	if (chs > MAX_SECTORS)
		return vdsk_error(EFBIG, "%s: VHD virtual size too large "
		    "(max 2040 GiB)", d->path);
	d->size = chs * 512;

	if (v->type == TYPE_FIXED) {
		if (d->size > d->file_size - FOOTER_LEN)
			return vdsk_error(EINVAL, "%s: fixed VHD is shorter than "
			    "its virtual size", d->path);
		return 0;
	}

	dataoff = be64_get(v->footer + 16);
	if (dataoff > d->file_size || d->file_size - dataoff < DYNHDR_LEN)
		return vdsk_error(EINVAL, "%s: VHD dynamic header offset %#llx "
		    "out of range", d->path, (unsigned long long)dataoff);
	if ((r = vdsk_pread(d, dh, DYNHDR_LEN, dataoff, "VHD dynamic header"))
	    < 0)
		return r;
	if (memcmp(dh, "cxsparse", 8) != 0)
		return vdsk_error(EINVAL, "%s: bad VHD dynamic header magic",
		    d->path);
	if (vhd_checksum(dh, DYNHDR_LEN, 36) != be32_get(dh + 36))
		return vdsk_error(EINVAL, "%s: VHD dynamic header checksum "
		    "mismatch", d->path);
	v->block_size = be32_get(dh + 32);
	if (v->block_size < 512 || v->block_size > MAX_BLOCK ||
	    (v->block_size & (v->block_size - 1)) != 0)
		return vdsk_error(EINVAL, "%s: invalid VHD block size %u",
		    d->path, v->block_size);
	v->bitmap_size = ((v->block_size / 4096) + 511) & ~511u;
	v->entries = be32_get(dh + 28);
	if ((uint64_t)v->entries > MAX_SECTORS * 512 / v->block_size)
		return vdsk_error(EINVAL, "%s: VHD BAT too large (%u entries)",
		    d->path, v->entries);
	if ((uint64_t)v->entries * v->block_size < d->size)
		return vdsk_error(EINVAL, "%s: VHD BAT too small for the "
		    "virtual size", d->path);
	v->bat_offset = be64_get(dh + 16);
	bat_bytes = (uint64_t)v->entries * 4;
	if (v->bat_offset < FOOTER_LEN || v->bat_offset > d->file_size ||
	    d->file_size - v->bat_offset < bat_bytes)
		return vdsk_error(EINVAL, "%s: VHD BAT offset %#llx out of "
		    "range", d->path, (unsigned long long)v->bat_offset);
	if ((v->bat = malloc(bat_bytes ? bat_bytes : 1)) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	if ((r = vdsk_pread(d, v->bat, bat_bytes, v->bat_offset, "VHD BAT"))
	    < 0)
		return r;
	v->next_free = (v->bat_offset + bat_bytes + 511) & ~511ULL;
	if (v->next_free < dataoff + DYNHDR_LEN)
		v->next_free = (dataoff + DYNHDR_LEN + 511) & ~511ULL;
	for (i = 0; i < v->entries; i++) {
		uint32_t e = be32_get((uint8_t *)&v->bat[i]);

		v->bat[i] = e;
		if (e == BAT_FREE)
			continue;
		end = (uint64_t)e * 512 + v->bitmap_size + v->block_size;
		if ((uint64_t)e * 512 < FOOTER_LEN || end > d->file_size)
			return vdsk_error(EINVAL, "%s: VHD block %u at sector %u "
			    "is outside the file", d->path, i, e);
		if (end > v->next_free)
			v->next_free = end;
	}
	if (v->next_free > d->file_size)
		return vdsk_error(EINVAL, "%s: VHD image is truncated",
		    d->path);
	return 0;
}

static void
vhd_close(struct vdsk *d)
{
	struct vhd *v = d->priv;

	free(v->bat);
	free(v);
	d->priv = NULL;
}

static int
vhd_read(struct vdsk *d, void *buf, uint64_t off, size_t len)
{
	struct vhd *v = d->priv;
	uint8_t *p = buf;

	if (v->type == TYPE_FIXED)
		return vdsk_pread(d, buf, len, off, "data");
	while (len > 0) {
		uint64_t blk = off / v->block_size;
		uint32_t in = (uint32_t)(off % v->block_size);
		size_t n = v->block_size - in < len ? v->block_size - in : len;
		int r;

		if (blk >= v->entries || v->bat[blk] == BAT_FREE) {
			memset(p, 0, n);
		} else {
			r = vdsk_pread(d, p, n, (uint64_t)v->bat[blk] * 512 +
			    v->bitmap_size + in, "data");
			if (r < 0)
				return r;
		}
		p += n;
		off += n;
		len -= n;
	}
	return 0;
}

static int
write_ones_bitmap(struct vdsk *d, uint64_t off)
{
	struct vhd *v = d->priv;
	uint8_t *bm;
	int r;

	if (v->last_bitmap == off)
		return 0;
	if ((bm = malloc(v->bitmap_size)) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	memset(bm, 0xff, v->bitmap_size);
	r = vdsk_pwrite(d, bm, v->bitmap_size, off, "VHD sector bitmap");
	free(bm);
	if (r == 0)
		v->last_bitmap = off;
	return r;
}

/* Zero [from, to) where it overlaps existing file contents. */
static int
zero_stale(struct vdsk *d, uint64_t from, uint64_t to)
{
	static const uint8_t zero[4096];
	off_t end = lseek(d->fd, 0, SEEK_END);
	int r;

	if (end < 0)
		return vdsk_error(errno, "%s: %s", d->path, strerror(errno));
	if ((uint64_t)end < to)
		to = (uint64_t)end;
	while (from < to) {
		size_t n = to - from < sizeof(zero) ? (size_t)(to - from) :
		    sizeof(zero);
		if ((r = vdsk_pwrite(d, zero, n, from, "VHD block")) < 0)
			return r;
		from += n;
	}
	return 0;
}

/*
 * New block at the old end of the data (where the footer was): first the
 * footer after the block, then the bitmap over the old footer, then the
 * BAT entry, so the file ends with a footer whenever a crash stops this.
 * Until the BAT entry is written the block is only leaked space.
 */
static int
alloc_block(struct vdsk *d, uint64_t blk)
{
	struct vhd *v = d->priv;
	uint64_t at = v->next_free, end;
	uint8_t e[4];
	int r;

	if (at / 512 >= BAT_FREE)
		return vdsk_error(EFBIG, "%s: VHD file too large", d->path);
	end = at + v->bitmap_size + v->block_size;
	if ((r = zero_stale(d, at + v->bitmap_size, end)) < 0 ||
	    (r = vdsk_pwrite(d, v->footer, FOOTER_LEN, end, "VHD footer")) < 0 ||
	    (r = write_ones_bitmap(d, at)) < 0)
		return r;
	be32_put(e, (uint32_t)(at / 512));
	if ((r = vdsk_pwrite(d, e, 4, v->bat_offset + blk * 4, "VHD BAT")) < 0)
		return r;
	v->bat[blk] = (uint32_t)(at / 512);
	v->next_free = end;
	return 0;
}

static int
vhd_write(struct vdsk *d, const void *buf, uint64_t off, size_t len)
{
	struct vhd *v = d->priv;
	const uint8_t *p = buf;
	int r;

	if (v->type == TYPE_FIXED)
		return vdsk_pwrite(d, buf, len, off, "data");
	while (len > 0) {
		uint64_t blk = off / v->block_size;
		uint32_t in = (uint32_t)(off % v->block_size);
		size_t n = v->block_size - in < len ? v->block_size - in : len;
		uint64_t base;

		if (blk >= v->entries)
			return vdsk_error(EIO, "%s: offset beyond the VHD BAT",
			    d->path);
		if (v->bat[blk] == BAT_FREE) {
			if ((r = alloc_block(d, blk)) < 0)
				return r;
		}
		base = (uint64_t)v->bat[blk] * 512;
		if ((r = write_ones_bitmap(d, base)) < 0 ||
		    (r = vdsk_pwrite(d, p, n, base + v->bitmap_size + in,
		    "data")) < 0)
			return r;
		p += n;
		off += n;
		len -= n;
	}
	return 0;
}

static int
vhd_flush(struct vdsk *d)
{
	if (fsync(d->fd) < 0)
		return vdsk_error(errno, "%s: fsync: %s", d->path,
		    strerror(errno));
	return 0;
}

static void
vhd_info(struct vdsk *d, struct vdsk_info *info)
{
	struct vhd *v = d->priv;

	info->cluster_size = v->type == TYPE_DYNAMIC ? v->block_size : 0;
}

static int
make_footer(uint8_t *f, int type, uint64_t size, uint16_t c, uint8_t h,
    uint8_t s)
{
	memset(f, 0, FOOTER_LEN);
	memcpy(f, "conectix", 8);
	be32_put(f + 8, 2);
	be32_put(f + 12, 0x00010000);
	be64_put(f + 16, type == TYPE_DYNAMIC ? FOOTER_LEN : UINT64_MAX);
	be32_put(f + 24, (uint32_t)(time(NULL) - EPOCH_2000));
	memcpy(f + 28, "qemu", 4);
	be16_put(f + 32, 5);
	be16_put(f + 34, 3);
	memcpy(f + 36, "Wi2k", 4);
	be64_put(f + 40, size);
	be64_put(f + 48, size);
	be16_put(f + 56, c);
	f[58] = h;
	f[59] = s;
	be32_put(f + 60, (uint32_t)type);
	if (getrandom(f + 68, 16, 0) != 16)
		return -1;
	f[68 + 6] = (uint8_t)((f[68 + 6] & 0x0f) | 0x40);
	f[68 + 8] = (uint8_t)((f[68 + 8] & 0x3f) | 0x80);
	be32_put(f + 64, vhd_checksum(f, FOOTER_LEN, 64));
	return 0;
}

static int
vhd_create_type(const char *path, uint64_t size, int type)
{
	struct vdsk tmp = { .path = (char *)path };
	uint8_t footer[FOOTER_LEN], dh[DYNHDR_LEN], ff[512];
	uint64_t sectors, want, entries = 0, bat_bytes = 0, i;
	uint16_t c = 0;
	uint8_t h = 0, s = 0;
	int r = 0;

	/* qemu-img create -f vpc, force_size=off: round up to CHS */
	want = (size + 511) / 512;
	sectors = want < MAX_GEOMETRY ? want : MAX_GEOMETRY;
	for (i = 0; sectors > (uint64_t)c * h * s; i++)
		chs_of(sectors + i, &c, &h, &s);
	if ((uint64_t)c * h * s == MAX_GEOMETRY) {
		sectors = want;
		if (sectors > MAX_SECTORS)
			return vdsk_error(EFBIG, "%s: VHD images are limited "
			    "to 2040 GiB", path);
	} else {
		sectors = (uint64_t)c * h * s;
	}
	if (make_footer(footer, type, sectors * 512, c, h, s) < 0)
		return vdsk_error(errno, "%s: getrandom: %s", path,
		    strerror(errno));

	tmp.fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (tmp.fd < 0)
		return vdsk_error(errno, "%s: %s", path, strerror(errno));
	if (type == TYPE_FIXED) {
		if (ftruncate(tmp.fd, (off_t)(sectors * 512)) < 0)
			r = vdsk_error(errno, "%s: truncate: %s", path,
			    strerror(errno));
		if (r == 0)
			r = vdsk_pwrite(&tmp, footer, FOOTER_LEN,
			    sectors * 512, "VHD footer");
		goto out;
	}
	entries = (sectors + DEF_BLOCK / 512 - 1) / (DEF_BLOCK / 512);
	bat_bytes = (entries * 4 + 511) & ~511ULL;
	memset(dh, 0, sizeof(dh));
	memcpy(dh, "cxsparse", 8);
	be64_put(dh + 8, UINT64_MAX);
	be64_put(dh + 16, 3 * 512);
	be32_put(dh + 24, 0x00010000);
	be32_put(dh + 28, (uint32_t)entries);
	be32_put(dh + 32, DEF_BLOCK);
	be32_put(dh + 36, vhd_checksum(dh, DYNHDR_LEN, 36));
	memset(ff, 0xff, sizeof(ff));
	r = vdsk_pwrite(&tmp, footer, FOOTER_LEN, 0, "VHD footer copy");
	if (r == 0)
		r = vdsk_pwrite(&tmp, dh, DYNHDR_LEN, 512, "VHD dynamic header");
	for (i = 0; r == 0 && i < bat_bytes; i += 512)
		r = vdsk_pwrite(&tmp, ff, 512, 3 * 512 + i, "VHD BAT");
	if (r == 0)
		r = vdsk_pwrite(&tmp, footer, FOOTER_LEN, 3 * 512 + bat_bytes,
		    "VHD footer");
out:
	if (close(tmp.fd) < 0 && r == 0)
		r = vdsk_error(errno, "%s: close: %s", path, strerror(errno));
	return r;
}

static int
vhd_create(const char *path, uint64_t size, const char *backing,
    const char *backing_fmt, uint32_t cluster_size, const char *subformat)
{
	(void)backing_fmt;
	if (backing != NULL)
		return vdsk_error(ENOTSUP, "%s: VHD backing files "
		    "(differencing disks) are not supported", path);
	if (cluster_size != 0 && cluster_size != DEF_BLOCK)
		return vdsk_error(EINVAL, "%s: VHD block size must be 2 MiB",
		    path);
	if (subformat == NULL || strcmp(subformat, "dynamic") == 0)
		return vhd_create_type(path, size, TYPE_DYNAMIC);
	if (strcmp(subformat, "fixed") == 0)
		return vhd_create_type(path, size, TYPE_FIXED);
	return vdsk_error(EINVAL, "%s: unknown VHD subformat '%s' (dynamic, "
	    "fixed)", path, subformat);
}

static int
vhd_create_default(const char *path, uint64_t size, const char *backing,
    const char *backing_fmt, uint32_t cluster_size)
{
	return vhd_create(path, size, backing, backing_fmt, cluster_size,
	    NULL);
}

const struct vdsk_ops vdsk_vpc_ops = {
	.name = "vpc",
	.open = vhd_open,
	.close = vhd_close,
	.read = vhd_read,
	.write = vhd_write,
	.flush = vhd_flush,
	.create = vhd_create_default,
	.info = vhd_info,
	.create_subformat = vhd_create,
};
