/*
 * libvdsk VDI driver (VirtualBox), header version 1.1: dynamic and static
 * images, read, write, create.  Differencing/undo images are refused.
 *
 * On disk (little-endian): a 64-byte text banner, the header at offset 64
 * (signature 0xbeda107f), the block map at offset_bmap (one 32-bit entry
 * per 1 MiB block: the index of the block in the data area, 0xffffffff
 * unallocated, 0xfffffffe discarded = zeroes) and the data area at
 * offset_data.  New blocks are appended at index blocks_allocated; the
 * block is written whole (zero-filled), then its map entry together with
 * the header's allocated count (see map_and_count()), so `qemu-img check`
 * stays clean even after a crash.
 */
#define _GNU_SOURCE
#include <sys/random.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vdsk_impl.h"

#define VDI_SIGNATURE   0xbeda107fu
#define VDI_VERSION     0x00010001u
#define VDI_HDR_OFF     64
#define VDI_HDR_SIZE    384             /* header_size as qemu writes it */
#define VDI_DYNAMIC     1
#define VDI_STATIC      2
#define VDI_BLOCK       (1u << 20)
#define VDI_FREE        0xffffffffu
#define VDI_DISCARDED   0xfffffffeu
#define VDI_MAX_BLOCKS  0x3fffffffu     /* as qemu */
#define VDI_BANNER      "<<< QEMU VM Virtual Disk Image >>>\n"

/* header field offsets (absolute, in the first 512 bytes) */
#define H_SIG           64
#define H_VERSION       68
#define H_HSIZE         72
#define H_TYPE          76
#define H_FLAGS         80
#define H_BMAP          340
#define H_DATA          344
#define H_SECSIZE       360
#define H_DISKSIZE      368
#define H_BLOCKSIZE     376
#define H_BLOCKEXTRA    380
#define H_BLOCKS        384
#define H_ALLOCATED     388
#define H_UUID          392
#define H_UUID_SNAP     408
#define H_UUID_LINK     424
#define H_UUID_PARENT   440

struct vdi {
	uint32_t type;
	uint32_t blocks;
	uint32_t allocated;             /* entries in use */
	uint32_t next_index;            /* data index for the next block */
	uint64_t offset_bmap;
	uint64_t offset_data;
	uint32_t *bmap;
	uint8_t *bbuf;                  /* one block, for allocation */
	uint8_t hdr[512];               /* the header sector as read */
};

static int
is_null_uuid(const uint8_t *p)
{
	static const uint8_t z[16];

	return memcmp(p, z, 16) == 0;
}

static int
vdi_open(struct vdsk *d)
{
	uint8_t h[512];
	struct vdi *v;
	uint64_t disk, bmap_bytes;
	uint32_t i, maxidx = 0;
	int r;

	if ((v = calloc(1, sizeof(*v))) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	d->priv = v;
	if ((r = vdsk_pread(d, h, sizeof(h), 0, "VDI header")) < 0)
		return r;
	memcpy(v->hdr, h, sizeof(h));
	if (le32_get(h + H_SIG) != VDI_SIGNATURE)
		return vdsk_error(EINVAL, "%s: not a VDI image", d->path);
	if (le32_get(h + H_VERSION) != VDI_VERSION)
		return vdsk_error(ENOTSUP, "%s: unsupported VDI version %u.%u",
		    d->path, le32_get(h + H_VERSION) >> 16,
		    le32_get(h + H_VERSION) & 0xffff);
	if (le32_get(h + H_HSIZE) < VDI_HDR_SIZE ||
	    le32_get(h + H_HSIZE) > 512 - VDI_HDR_OFF)
		return vdsk_error(EINVAL, "%s: invalid VDI header size %u",
		    d->path, le32_get(h + H_HSIZE));
	v->type = le32_get(h + H_TYPE);
	if (v->type != VDI_DYNAMIC && v->type != VDI_STATIC)
		return vdsk_error(ENOTSUP, "%s: unsupported VDI image type %u "
		    "(only dynamic and static)", d->path, v->type);
	if (!is_null_uuid(h + H_UUID_LINK) || !is_null_uuid(h + H_UUID_PARENT))
		return vdsk_error(ENOTSUP, "%s: differencing VDI images are "
		    "not supported", d->path);
	if (le32_get(h + H_SECSIZE) != 512)
		return vdsk_error(ENOTSUP, "%s: unsupported VDI sector size %u",
		    d->path, le32_get(h + H_SECSIZE));
	if (le32_get(h + H_BLOCKSIZE) != VDI_BLOCK ||
	    le32_get(h + H_BLOCKEXTRA) != 0)
		return vdsk_error(ENOTSUP, "%s: unsupported VDI block size %u "
		    "(+%u): only 1 MiB blocks", d->path,
		    le32_get(h + H_BLOCKSIZE), le32_get(h + H_BLOCKEXTRA));
	v->blocks = le32_get(h + H_BLOCKS);
	disk = le64_get(h + H_DISKSIZE);
	if (v->blocks > VDI_MAX_BLOCKS)
		return vdsk_error(EFBIG, "%s: too many VDI blocks (%u)",
		    d->path, v->blocks);
	if (disk > (uint64_t)v->blocks * VDI_BLOCK)
		return vdsk_error(EINVAL, "%s: VDI disk size %llu exceeds the "
		    "block map (%u blocks)", d->path,
		    (unsigned long long)disk, v->blocks);
	d->size = disk & ~511ULL;
	v->offset_bmap = le32_get(h + H_BMAP);
	v->offset_data = le32_get(h + H_DATA);
	bmap_bytes = (uint64_t)v->blocks * 4;
	if (v->offset_bmap % 512 != 0 || v->offset_data % 512 != 0 ||
	    v->offset_bmap < 512 ||
	    v->offset_bmap + bmap_bytes > v->offset_data)
		return vdsk_error(EINVAL, "%s: invalid VDI block map/data "
		    "offsets (%#llx, %#llx)", d->path,
		    (unsigned long long)v->offset_bmap,
		    (unsigned long long)v->offset_data);
	if (v->offset_bmap + bmap_bytes > d->file_size)
		return vdsk_error(EINVAL, "%s: VDI block map is beyond the end "
		    "of the file", d->path);
	if ((v->bmap = malloc(bmap_bytes ? bmap_bytes : 1)) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	if ((r = vdsk_pread(d, v->bmap, bmap_bytes, v->offset_bmap,
	    "VDI block map")) < 0)
		return r;
	for (i = 0; i < v->blocks; i++) {
		uint32_t e = le32_get((uint8_t *)&v->bmap[i]);

		v->bmap[i] = e;
		if (e >= VDI_DISCARDED)
			continue;
		if (e >= v->blocks)
			return vdsk_error(EINVAL, "%s: VDI block %u maps to "
			    "data block %u beyond the image", d->path, i, e);
		v->allocated++;
		if (e + 1 > maxidx)
			maxidx = e + 1;
	}
	v->next_index = maxidx;
	return 0;
}

static void
vdi_close(struct vdsk *d)
{
	struct vdi *v = d->priv;

	free(v->bmap);
	free(v->bbuf);
	free(v);
	d->priv = NULL;
}

static int
vdi_read(struct vdsk *d, void *buf, uint64_t off, size_t len)
{
	struct vdi *v = d->priv;
	uint8_t *p = buf;
	int r;

	while (len > 0) {
		uint64_t blk = off / VDI_BLOCK;
		uint32_t in = (uint32_t)(off % VDI_BLOCK);
		size_t n = VDI_BLOCK - in < len ? VDI_BLOCK - in : len;
		uint32_t e = blk < v->blocks ? v->bmap[blk] : VDI_FREE;

		if (e >= VDI_DISCARDED) {
			memset(p, 0, n);
		} else if ((r = vdsk_pread(d, p, n, v->offset_data +
		    (uint64_t)e * VDI_BLOCK + in, "data")) < 0) {
			/* a short static or dynamic file: fail like qemu */
			return r;
		}
		p += n;
		off += n;
		len -= n;
	}
	return 0;
}

/*
 * Map block blk to data block idx and count it in the header.  qemu-img
 * check calls a count that differs from the map a corruption, and qemu
 * allocates its next block at the count, so a count left too low by a
 * crash would make it reuse a block in use.  With the usual layout (the
 * map right after the header sector) and the entry within the first
 * 4 KiB, both go in one pwrite within one page, which a crash (SIGKILL)
 * cannot tear: the header from the count to its end, then the map up to
 * the entry.  Otherwise the count goes first: a crash between the two
 * writes leaves it one too high, which wastes a block at worst.
 */
static int
map_and_count(struct vdsk *d, uint64_t blk, uint32_t idx)
{
	struct vdi *v = d->priv;
	uint8_t buf[4096 - H_ALLOCATED], e[4], cnt[4];
	uint64_t i, end = v->offset_bmap + (blk + 1) * 4;
	int r;

	le32_put(e, idx);
	le32_put(cnt, v->allocated + 1);
	if (v->offset_bmap == sizeof(v->hdr) && end <= 4096) {
		memcpy(buf, v->hdr + H_ALLOCATED, sizeof(v->hdr) - H_ALLOCATED);
		memcpy(buf, cnt, 4);
		for (i = 0; i < blk; i++)
			le32_put(buf + sizeof(v->hdr) - H_ALLOCATED + i * 4,
			    v->bmap[i]);
		memcpy(buf + sizeof(v->hdr) - H_ALLOCATED + blk * 4, e, 4);
		r = vdsk_pwrite(d, buf, (size_t)(end - H_ALLOCATED),
		    H_ALLOCATED, "VDI header and block map");
	} else if ((r = vdsk_pwrite(d, cnt, 4, H_ALLOCATED,
	    "VDI header")) == 0) {
		r = vdsk_pwrite(d, e, 4, v->offset_bmap + blk * 4,
		    "VDI block map");
	}
	if (r == 0)
		memcpy(v->hdr + H_ALLOCATED, cnt, 4);
	return r;
}

static int
alloc_block(struct vdsk *d, uint64_t blk, const uint8_t *data, uint32_t in,
    size_t n)
{
	struct vdi *v = d->priv;
	uint32_t idx = v->next_index;
	int r;

	if (idx >= v->blocks)
		return vdsk_error(EIO, "%s: VDI block map is inconsistent (no "
		    "free data block)", d->path);
	if (v->bbuf == NULL && (v->bbuf = malloc(VDI_BLOCK)) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	memset(v->bbuf, 0, VDI_BLOCK);
	memcpy(v->bbuf + in, data, n);
	if ((r = vdsk_pwrite(d, v->bbuf, VDI_BLOCK,
	    v->offset_data + (uint64_t)idx * VDI_BLOCK, "data")) < 0)
		return r;
	if ((r = map_and_count(d, blk, idx)) < 0)
		return r;
	v->bmap[blk] = idx;
	v->allocated++;
	v->next_index = idx + 1;
	return 0;
}

static int
vdi_write(struct vdsk *d, const void *buf, uint64_t off, size_t len)
{
	struct vdi *v = d->priv;
	const uint8_t *p = buf;
	int r;

	while (len > 0) {
		uint64_t blk = off / VDI_BLOCK;
		uint32_t in = (uint32_t)(off % VDI_BLOCK);
		size_t n = VDI_BLOCK - in < len ? VDI_BLOCK - in : len;

		if (blk >= v->blocks)
			return vdsk_error(EIO, "%s: offset beyond the VDI block "
			    "map", d->path);
		if (v->bmap[blk] >= VDI_DISCARDED)
			r = alloc_block(d, blk, p, in, n);
		else
			r = vdsk_pwrite(d, p, n, v->offset_data +
			    (uint64_t)v->bmap[blk] * VDI_BLOCK + in, "data");
		if (r < 0)
			return r;
		p += n;
		off += n;
		len -= n;
	}
	return 0;
}

static int
vdi_flush(struct vdsk *d)
{
	if (fsync(d->fd) < 0)
		return vdsk_error(errno, "%s: fsync: %s", d->path,
		    strerror(errno));
	return 0;
}

static void
vdi_info(struct vdsk *d, struct vdsk_info *info)
{
	(void)d;
	info->cluster_size = VDI_BLOCK;
}

static void
random_uuid(uint8_t *u)
{
	if (getrandom(u, 16, 0) != 16)
		memset(u, 0x5a, 16);
	u[6] = (uint8_t)((u[6] & 0x0f) | 0x40);
	u[8] = (uint8_t)((u[8] & 0x3f) | 0x80);
}

static int
vdi_create_type(const char *path, uint64_t size, uint32_t type)
{
	struct vdsk tmp = { .path = (char *)path };
	uint8_t h[512], *bmap;
	uint64_t blocks, bmap_bytes, i;
	int r = 0;

	size = (size + 511) & ~511ULL;
	blocks = (size + VDI_BLOCK - 1) / VDI_BLOCK;
	if (blocks > VDI_MAX_BLOCKS)
		return vdsk_error(EFBIG, "%s: size too large for VDI", path);
	bmap_bytes = (blocks * 4 + 511) & ~511ULL;
	memset(h, 0, sizeof(h));
	memcpy(h, VDI_BANNER, sizeof(VDI_BANNER) - 1);
	le32_put(h + H_SIG, VDI_SIGNATURE);
	le32_put(h + H_VERSION, VDI_VERSION);
	le32_put(h + H_HSIZE, VDI_HDR_SIZE);
	le32_put(h + H_TYPE, type);
	le32_put(h + H_FLAGS, 0);
	le32_put(h + H_BMAP, 512);
	le32_put(h + H_DATA, (uint32_t)(512 + bmap_bytes));
	le32_put(h + H_SECSIZE, 512);
	le64_put(h + H_DISKSIZE, size);
	le32_put(h + H_BLOCKSIZE, VDI_BLOCK);
	le32_put(h + H_BLOCKS, (uint32_t)blocks);
	le32_put(h + H_ALLOCATED, type == VDI_STATIC ? (uint32_t)blocks : 0);
	random_uuid(h + H_UUID);
	random_uuid(h + H_UUID_SNAP);
	if ((bmap = malloc(bmap_bytes ? bmap_bytes : 1)) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	memset(bmap, 0, bmap_bytes);
	for (i = 0; i < blocks; i++)
		le32_put(bmap + i * 4, type == VDI_STATIC ? (uint32_t)i :
		    VDI_FREE);
	tmp.fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (tmp.fd < 0) {
		free(bmap);
		return vdsk_error(errno, "%s: %s", path, strerror(errno));
	}
	r = vdsk_pwrite(&tmp, h, sizeof(h), 0, "VDI header");
	if (r == 0 && bmap_bytes)
		r = vdsk_pwrite(&tmp, bmap, bmap_bytes, 512, "VDI block map");
	if (r == 0 && type == VDI_STATIC && ftruncate(tmp.fd,
	    (off_t)(512 + bmap_bytes + blocks * VDI_BLOCK)) < 0)
		r = vdsk_error(errno, "%s: truncate: %s", path,
		    strerror(errno));
	free(bmap);
	if (close(tmp.fd) < 0 && r == 0)
		r = vdsk_error(errno, "%s: close: %s", path, strerror(errno));
	return r;
}

static int
vdi_create(const char *path, uint64_t size, const char *backing,
    const char *backing_fmt, uint32_t cluster_size, const char *subformat)
{
	(void)backing_fmt;
	if (backing != NULL)
		return vdsk_error(ENOTSUP, "%s: VDI backing files are not "
		    "supported", path);
	if (cluster_size != 0 && cluster_size != VDI_BLOCK)
		return vdsk_error(EINVAL, "%s: VDI block size must be 1 MiB",
		    path);
	if (subformat == NULL || strcmp(subformat, "dynamic") == 0)
		return vdi_create_type(path, size, VDI_DYNAMIC);
	if (strcmp(subformat, "static") == 0 || strcmp(subformat, "fixed") == 0)
		return vdi_create_type(path, size, VDI_STATIC);
	return vdsk_error(EINVAL, "%s: unknown VDI subformat '%s' (dynamic, "
	    "static)", path, subformat);
}

static int
vdi_create_default(const char *path, uint64_t size, const char *backing,
    const char *backing_fmt, uint32_t cluster_size)
{
	return vdi_create(path, size, backing, backing_fmt, cluster_size, NULL);
}

const struct vdsk_ops vdsk_vdi_ops = {
	.name = "vdi",
	.open = vdi_open,
	.close = vdi_close,
	.read = vdi_read,
	.write = vdi_write,
	.flush = vdi_flush,
	.create = vdi_create_default,
	.info = vdi_info,
	.create_subformat = vdi_create,
};
