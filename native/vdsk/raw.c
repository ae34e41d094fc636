/* libvdsk raw format: the file is the disk. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "vdsk_impl.h"

static int
raw_open(struct vdsk *d)
{
	d->size = d->file_size;
	return 0;
}

static void
raw_close(struct vdsk *d)
{
	(void)d;
}

static int
raw_read(struct vdsk *d, void *buf, uint64_t off, size_t len)
{
	return vdsk_pread(d, buf, len, off, "data");
}

static int
raw_write(struct vdsk *d, const void *buf, uint64_t off, size_t len)
{
	return vdsk_pwrite(d, buf, len, off, "data");
}

/* The file is the disk: every guest range is plain bytes at its offset. */
static int
raw_host_extent(struct vdsk *d, uint64_t off, uint64_t len, uint64_t *host,
    uint64_t *pnum)
{
	(void)d;
	*host = off;
	*pnum = len;
	return 1;
}

static int
raw_copy_in(struct vdsk *d, uint64_t off, size_t len, int sfd, uint64_t soff)
{
	return vdsk_copy_file(d, sfd, soff, off, len, "data");
}

/* Holes read as zeroes; there is no backing file to fall through to. */
static int
raw_block_status(struct vdsk *d, uint64_t off, uint64_t len, uint64_t *pnum)
{
	off_t data, hole;

	data = lseek(d->fd, (off_t)off, SEEK_DATA);
	if (data < 0 && errno == ENXIO) {
		*pnum = len;                    /* a hole up to the end */
		return VDSK_BS_ZERO;
	}
	if (data < 0) {
		*pnum = len;                    /* cannot tell: say data */
		return VDSK_BS_DATA;
	}
	if ((uint64_t)data > off) {
		*pnum = (uint64_t)data - off < len ? (uint64_t)data - off : len;
		return VDSK_BS_ZERO;
	}
	hole = lseek(d->fd, (off_t)off, SEEK_HOLE);
	if (hole < 0 || (uint64_t)hole <= off)
		hole = (off_t)(off + len);
	*pnum = (uint64_t)hole - off < len ? (uint64_t)hole - off : len;
	return VDSK_BS_DATA;
}

static int
raw_flush(struct vdsk *d)
{
	if (fsync(d->fd) < 0)
		return vdsk_error(errno, "%s: fsync: %s", d->path,
		    strerror(errno));
	return 0;
}

static int
raw_create(const char *path, uint64_t size, const char *backing,
    const char *backing_fmt, uint32_t cluster_size)
{
	int fd, r = 0;

	(void)backing_fmt;
	if (backing != NULL)
		return vdsk_error(EINVAL, "%s: raw images cannot have a "
		    "backing file", path);
	if (cluster_size != 0)
		return vdsk_error(EINVAL, "%s: raw images have no cluster "
		    "size", path);
	fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return vdsk_error(errno, "%s: %s", path, strerror(errno));
	if (ftruncate(fd, (off_t)size) < 0)
		r = vdsk_error(errno, "%s: truncate: %s", path,
		    strerror(errno));
	if (close(fd) < 0 && r == 0)
		r = vdsk_error(errno, "%s: close: %s", path, strerror(errno));
	return r;
}

const struct vdsk_ops vdsk_raw_ops = {
	.name = "raw",
	.open = raw_open,
	.close = raw_close,
	.read = raw_read,
	.write = raw_write,
	.flush = raw_flush,
	.create = raw_create,
	.info = NULL,
	.block_status = raw_block_status,
	.host_extent = raw_host_extent,
	.copy_in = raw_copy_in,
	.threadsafe = 1,
};
