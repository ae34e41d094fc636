/*
 * libvdsk common layer: errors, probing, open/close, bounds checks and
 * dispatch to the format drivers, backing chains.
 */
#define _GNU_SOURCE
#include <sys/stat.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vdsk_impl.h"

static _Thread_local int last_err;
static _Thread_local char last_msg[512];

int
vdsk_error(int err, const char *fmt, ...)
{
	va_list ap;

	if (err <= 0)
		err = EIO;
	last_err = err;
	va_start(ap, fmt);
	vsnprintf(last_msg, sizeof(last_msg), fmt, ap);
	va_end(ap);
	return -err;
}

int
vdsk_errno(void)
{
	return last_err;
}

const char *
vdsk_errmsg(void)
{
	return last_msg[0] ? last_msg : "no error";
}

#define BOUNCE  (1u << 20)

int
vdsk_read_fd(int fd, void *buf, size_t len, uint64_t off)
{
	uint8_t *p = buf;

	while (len > 0) {
		ssize_t n = pread(fd, p, len, (off_t)off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return -EIO;
		p += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

int
vdsk_pread(struct vdsk *d, void *buf, size_t len, uint64_t off,
    const char *what)
{
	uint8_t *p = buf;

	if (off > (uint64_t)INT64_MAX - len)
		return vdsk_error(EIO, "%s: %s offset %#llx out of range",
		    d->path, what, (unsigned long long)off);
	while (len > 0) {
		ssize_t n = pread(d->fd, p, len, (off_t)off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return vdsk_error(errno, "%s: reading %s at %#llx: %s",
			    d->path, what, (unsigned long long)off,
			    strerror(errno));
		}
		if (n == 0)
			return vdsk_error(EIO, "%s: %s at %#llx is beyond the "
			    "end of the file", d->path, what,
			    (unsigned long long)off);
		p += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

int
vdsk_pwrite(struct vdsk *d, const void *buf, size_t len, uint64_t off,
    const char *what)
{
	const uint8_t *p = buf;

	if (off > (uint64_t)INT64_MAX - len)
		return vdsk_error(EFBIG, "%s: %s offset %#llx out of range",
		    d->path, what, (unsigned long long)off);
	while (len > 0) {
		ssize_t n = pwrite(d->fd, p, len, (off_t)off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return vdsk_error(errno, "%s: writing %s at %#llx: %s",
			    d->path, what, (unsigned long long)off,
			    strerror(errno));
		}
		p += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

/*
 * Copy len bytes of sfd at soff into d->fd at doff inside the kernel
 * (copy_file_range: one copy instead of read + write, or a block clone
 * where the file system can share extents).  Falls back to pread/pwrite
 * through a bounce buffer where the kernel or file system cannot do it.
 * A source shorter than soff + len is -EIO, like vdsk_pread().
 */
int
vdsk_copy_file(struct vdsk *d, int sfd, uint64_t soff, uint64_t doff,
    size_t len, const char *what)
{
	uint8_t *bounce = NULL;
	size_t n;
	int r = 0;

	if (soff > (uint64_t)INT64_MAX - len ||
	    doff > (uint64_t)INT64_MAX - len)
		return vdsk_error(EFBIG, "%s: %s offset %#llx out of range",
		    d->path, what, (unsigned long long)doff);
#ifdef VDSK_HAVE_COPY_FILE_RANGE
	while (len > 0) {
		off_t in = (off_t)soff, out = (off_t)doff;
		ssize_t c = copy_file_range(sfd, &in, d->fd, &out, len, 0);

		if (c < 0 && errno == EINTR)
			continue;
		if (c < 0 && (errno == EXDEV || errno == ENOSYS ||
		    errno == EOPNOTSUPP || errno == EINVAL ||
		    errno == EBADF))
			break;                  /* not here: bounce below */
		if (c < 0)
			return vdsk_error(errno, "%s: copying %s to %#llx: %s",
			    d->path, what, (unsigned long long)doff,
			    strerror(errno));
		if (c == 0)
			return vdsk_error(EIO, "%s: source of %s at %#llx is "
			    "beyond the end of its file", d->path, what,
			    (unsigned long long)soff);
		soff += (uint64_t)c;
		doff += (uint64_t)c;
		len -= (size_t)c;
	}
#endif
	if (len > 0 && (bounce = malloc(len < BOUNCE ? len : BOUNCE)) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	while (len > 0 && r == 0) {
		n = len < BOUNCE ? len : BOUNCE;
		r = vdsk_read_fd(sfd, bounce, n, soff);
		if (r < 0)
			r = vdsk_error(-r, "%s: reading the source of %s at "
			    "%#llx: %s", d->path, what,
			    (unsigned long long)soff, r == -EIO ?
			    "beyond the end of the file" : strerror(-r));
		else
			r = vdsk_pwrite(d, bounce, n, doff, what);
		soff += n;
		doff += n;
		len -= n;
	}
	free(bounce);
	return r;
}

/* Formats we recognise; those without ops are reported as unsupported. */
static const struct {
	const char *name;
	size_t off;
	size_t len;
	const char *magic;
} probes[] = {
	{ "qcow2", 0, 4, "QFI\xfb" },
	{ "qed", 0, 4, "QED\0" },
	{ "vmdk", 0, 4, "KDMV" },
	{ "vmdk", 0, 21, "# Disk DescriptorFile" },
	{ "vdi", 64, 4, "\x7f\x10\xda\xbe" },
	{ "vhdx", 0, 8, "vhdxfile" },
	{ "vpc", 0, 8, "conectix" },
	{ "luks", 0, 6, "LUKS\xba\xbe" },
};

int
vdsk_probe_fd(int fd, const char **name)
{
	uint8_t buf[128];
	ssize_t n;
	size_t i;

	do {
		n = pread(fd, buf, sizeof(buf), 0);
	} while (n < 0 && errno == EINTR);
	if (n < 0)
		return vdsk_error(errno, "probing: %s", strerror(errno));
	for (i = 0; i < sizeof(probes) / sizeof(probes[0]); i++) {
		if ((size_t)n >= probes[i].off + probes[i].len &&
		    memcmp(buf + probes[i].off, probes[i].magic,
		    probes[i].len) == 0) {
			*name = probes[i].name;
			/* qcow version 1 shares the magic */
			if (i == 0 && n >= 8 && be32_get(buf + 4) == 1)
				*name = "qcow";
			return 0;
		}
	}
	*name = "raw";
	return 0;
}

static const struct vdsk_ops *
find_ops(const char *fmt)
{
	if (strcmp(fmt, "raw") == 0)
		return &vdsk_raw_ops;
	if (strcmp(fmt, "qcow2") == 0)
		return &vdsk_qcow2_ops;
	if (strcmp(fmt, "vmdk") == 0)
		return &vdsk_vmdk_ops;
	if (strcmp(fmt, "vdi") == 0)
		return &vdsk_vdi_ops;
	if (strcmp(fmt, "vpc") == 0 || strcmp(fmt, "vhd") == 0)
		return &vdsk_vpc_ops;
	return NULL;
}

char *
vdsk_backing_path(const char *image_path, const char *backing)
{
	const char *slash = strrchr(image_path, '/');
	size_t dlen;
	char *p;

	if (backing[0] == '/' || slash == NULL)
		return strdup(backing);
	dlen = (size_t)(slash - image_path) + 1;
	p = malloc(dlen + strlen(backing) + 1);
	if (p == NULL)
		return NULL;
	memcpy(p, image_path, dlen);
	strcpy(p + dlen, backing);
	return p;
}

static struct vdsk *
open_common(const char *path, const char *fmt, int flags, int depth,
    const struct vdsk *child, uint64_t l2_cache_bytes)
{
	const struct vdsk_ops *ops;
	const struct vdsk *c;
	struct vdsk *d;
	struct stat st;
	int fd, r;

	if (path == NULL || path[0] == '\0') {
		vdsk_error(EINVAL, "empty image path");
		return NULL;
	}
	if (depth > VDSK_MAX_CHAIN) {
		vdsk_error(ELOOP, "%s: backing chain deeper than %d images",
		    path, VDSK_MAX_CHAIN);
		return NULL;
	}
	/* O_NONBLOCK: a FIFO named by a hostile image must not hang us */
	fd = open(path, ((flags & VDSK_RDONLY) ? O_RDONLY : O_RDWR) |
	    O_CLOEXEC | O_NONBLOCK);
	if (fd < 0) {
		vdsk_error(errno, "%s: %s", path, strerror(errno));
		return NULL;
	}
	if (fstat(fd, &st) < 0 ||
	    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) < 0) {
		vdsk_error(errno, "%s: %s", path, strerror(errno));
		close(fd);
		return NULL;
	}
	if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode) &&
	    !S_ISCHR(st.st_mode)) {
		vdsk_error(EINVAL, "%s: not a regular file or device", path);
		close(fd);
		return NULL;
	}
	for (c = child; c != NULL; c = c->child) {
		if (c->dev == st.st_dev && c->ino == st.st_ino) {
			vdsk_error(ELOOP, "%s: backing chain loop (already "
			    "used by %s)", path, c->path);
			close(fd);
			return NULL;
		}
	}
	if (fmt == NULL) {
		if (vdsk_probe_fd(fd, &fmt) < 0) {
			close(fd);
			return NULL;
		}
	}
	ops = find_ops(fmt);
	if (ops == NULL) {
		vdsk_error(ENOTSUP, "%s: image format '%s' is not supported",
		    path, fmt);
		close(fd);
		return NULL;
	}
	d = calloc(1, sizeof(*d));
	if (d == NULL || (d->path = strdup(path)) == NULL) {
		free(d);
		vdsk_error(ENOMEM, "out of memory");
		close(fd);
		return NULL;
	}
	if (pthread_mutex_init(&d->meta, NULL) != 0) {
		free(d->path);
		free(d);
		vdsk_error(ENOMEM, "out of memory");
		close(fd);
		return NULL;
	}
	if (vdsk_rl_init(&d->rl) < 0) {
		pthread_mutex_destroy(&d->meta);
		free(d->path);
		free(d);
		vdsk_error(ENOMEM, "out of memory");
		close(fd);
		return NULL;
	}
	d->ops = ops;
	d->fd = fd;
	d->l2_cache_bytes = l2_cache_bytes;
	d->flags = flags;
	d->depth = depth;
	d->dev = st.st_dev;
	d->ino = st.st_ino;
	d->child = child;
	if (S_ISREG(st.st_mode)) {
		d->file_size = (uint64_t)st.st_size;
	} else {
		off_t end = lseek(fd, 0, SEEK_END);
		d->file_size = end < 0 ? 0 : (uint64_t)end;
	}
	r = ops->open(d);
	if (r == 0 && !(flags & VDSK_NO_BACKING))
		r = vdsk_open_backing(d);
	if (r < 0) {
		/* keep the driver's message: close paths never set errors */
		vdsk_close(d);
		return NULL;
	}
	d->lock_align = 1;
	if (ops->info != NULL) {
		struct vdsk_info inf;

		memset(&inf, 0, sizeof(inf));
		ops->info(d, &inf);
		if (inf.cluster_size > 1)
			d->lock_align = inf.cluster_size;
	}
	return d;
}

struct vdsk *
vdsk_open_internal(const char *path, const char *fmt, int flags, int depth,
    const struct vdsk *child)
{
	return open_common(path, fmt, flags, depth, child, 0);
}

int
vdsk_open_backing(struct vdsk *d)
{
	char *bpath;

	if (d->backing_file[0] == '\0')
		return 0;
	bpath = vdsk_backing_path(d->path, d->backing_file);
	if (bpath == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	d->backing = open_common(bpath,
	    d->backing_fmt[0] ? d->backing_fmt : NULL, VDSK_RDONLY,
	    d->depth + 1, d, d->l2_cache_bytes);
	if (d->backing == NULL) {
		int err = vdsk_errno();
		char msg[sizeof(last_msg)];

		snprintf(msg, sizeof(msg), "%s", vdsk_errmsg());
		free(bpath);
		return vdsk_error(err, "%s: opening backing file: %s",
		    d->path, msg);
	}
	free(bpath);
	return 0;
}

int
vdsk_read_backing(struct vdsk *d, void *buf, uint64_t off, size_t len)
{
	uint64_t bsize;
	size_t n = 0;

	if (d->backing != NULL) {
		bsize = d->backing->size;
		if (off < bsize) {
			n = bsize - off < len ? (size_t)(bsize - off) : len;
			struct vdsk *b = d->backing;
			int r;

			if (!b->ops->threadsafe)
				vdsk_meta_lock(b);
			r = b->ops->read(b, buf, off, n);
			if (!b->ops->threadsafe)
				vdsk_meta_unlock(b);
			if (r < 0)
				return r;
		}
	}
	memset((uint8_t *)buf + n, 0, len - n);
	return 0;
}

vdsk_t *
vdsk_open2(const char *path, const char *fmt, int flags,
    const struct vdsk_open_opts *opts)
{
	last_err = 0;
	last_msg[0] = '\0';
	if (flags & ~(VDSK_RDONLY | VDSK_NO_BACKING)) {
		vdsk_error(EINVAL, "unknown open flags %#x", flags);
		return NULL;
	}
	return open_common(path, fmt, flags, 0, NULL,
	    opts != NULL ? opts->l2_cache_size : 0);
}

vdsk_t *
vdsk_open(const char *path, const char *fmt, int flags)
{
	return vdsk_open2(path, fmt, flags, NULL);
}

int
vdsk_close(vdsk_t *d)
{
	int r = 0;

	if (d == NULL)
		return 0;
	if (d->backing != NULL)
		vdsk_close(d->backing);
	if (d->priv != NULL)
		d->ops->close(d);
	if (close(d->fd) < 0)
		r = vdsk_error(errno, "%s: close: %s", d->path,
		    strerror(errno));
	vdsk_rl_destroy(&d->rl);
	pthread_mutex_destroy(&d->meta);
	free(d->path);
	free(d);
	return r;
}

uint64_t
vdsk_size(const vdsk_t *d)
{
	return d->size;
}

static int
check_range(vdsk_t *d, uint64_t off, size_t len)
{
	if (off > d->size || len > d->size - off)
		return vdsk_error(EINVAL, "%s: range %#llx+%#zx is beyond the "
		    "virtual size %#llx", d->path, (unsigned long long)off,
		    len, (unsigned long long)d->size);
	return 0;
}

/*
 * Locking for requests.  Reads and writes lock their guest range, widened
 * to whole clusters (shared/exclusive); discard and compressed writes lock
 * theirs exclusive; resize, snapshot create/apply/delete and check lock
 * the whole image exclusive, so they wait for all requests in flight and
 * none start under them (d->size is only read under a range lock).  A
 * driver that is not threadsafe also runs under d->meta as a whole; a
 * threadsafe one takes d->meta itself around its metadata work.
 */
static int
range_begin(vdsk_t *d, struct vdsk_rl_entry *e, uint64_t off, uint64_t len,
    int excl)
{
	uint64_t a = d->lock_align ? d->lock_align : 512, s, end;

	if (len > UINT64_MAX - off || off + len > UINT64_MAX - a)
		return vdsk_error(EINVAL, "%s: range %#llx+%#llx overflows",
		    d->path, (unsigned long long)off, (unsigned long long)len);
	s = off / a * a;
	end = (off + len + a - 1) / a * a;
	vdsk_rl_lock(&d->rl, e, s, end - s, excl);
	if (!d->ops->threadsafe)
		vdsk_meta_lock(d);
	return 0;
}

static void
range_end(vdsk_t *d, struct vdsk_rl_entry *e)
{
	if (!d->ops->threadsafe)
		vdsk_meta_unlock(d);
	vdsk_rl_unlock(&d->rl, e);
}

/* The whole image, exclusive. */
static void
excl_begin(vdsk_t *d, struct vdsk_rl_entry *e)
{
	vdsk_rl_lock(&d->rl, e, 0, UINT64_MAX, 1);
	if (!d->ops->threadsafe)
		vdsk_meta_lock(d);
}

static int
locked_io(vdsk_t *d, void *rbuf, const void *wbuf, uint64_t off, size_t len)
{
	struct vdsk_rl_entry e;
	int r;

	if ((r = range_begin(d, &e, off, len, wbuf != NULL)) < 0)
		return r;
	if ((r = check_range(d, off, len)) == 0 && len > 0) {
		if (wbuf != NULL)
			r = d->ops->write(d, wbuf, off, len);
		else
			r = d->ops->read(d, rbuf, off, len);
	}
	range_end(d, &e);
	return r;
}

int
vdsk_read(vdsk_t *d, void *buf, uint64_t off, size_t len)
{
	return locked_io(d, buf, NULL, off, len);
}

int
vdsk_write(vdsk_t *d, const void *buf, uint64_t off, size_t len)
{
	if (d->flags & VDSK_RDONLY)
		return vdsk_error(EROFS, "%s: image is open read-only",
		    d->path);
	return locked_io(d, NULL, buf, off, len);
}

int
vdsk_host_extent(struct vdsk *d, uint64_t off, uint64_t len, uint64_t *host,
    uint64_t *pnum)
{
	int r;

	*host = 0;
	*pnum = len;
	if (d->ops->host_extent == NULL)
		return 0;
	if (d->ops->threadsafe)
		return d->ops->host_extent(d, off, len, host, pnum);
	vdsk_meta_lock(d);
	r = d->ops->host_extent(d, off, len, host, pnum);
	vdsk_meta_unlock(d);
	return r;
}

/* copy_in without the op: through a bounce buffer and the write op. */
static int
copy_in_bounce(vdsk_t *d, uint64_t off, size_t len, int sfd, uint64_t soff)
{
	uint8_t *b;
	size_t n;
	int r = 0;

	if ((b = malloc(len < BOUNCE ? len : BOUNCE)) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	while (len > 0 && r == 0) {
		n = len < BOUNCE ? len : BOUNCE;
		if ((r = vdsk_read_fd(sfd, b, n, soff)) < 0)
			r = vdsk_error(-r, "%s: reading the source to copy to "
			    "%#llx: %s", d->path, (unsigned long long)off,
			    r == -EIO ? "beyond the end of the file" :
			    strerror(-r));
		else
			r = d->ops->write(d, b, off, n);
		off += n;
		soff += n;
		len -= n;
	}
	free(b);
	return r;
}

int
vdsk_copy_in(vdsk_t *d, uint64_t off, size_t len, int sfd, uint64_t soff)
{
	struct vdsk_rl_entry e;
	int r;

	if (d->flags & VDSK_RDONLY)
		return vdsk_error(EROFS, "%s: image is open read-only",
		    d->path);
	if ((r = range_begin(d, &e, off, len, 1)) < 0)
		return r;
	if ((r = check_range(d, off, len)) == 0 && len > 0) {
		if (d->ops->copy_in != NULL)
			r = d->ops->copy_in(d, off, len, sfd, soff);
		else
			r = copy_in_bounce(d, off, len, sfd, soff);
	}
	range_end(d, &e);
	return r;
}

void
vdsk_start_writeback(struct vdsk *d)
{
#ifdef SYNC_FILE_RANGE_WRITE
	/* a hint: errors show in the fsync that follows */
	(void)sync_file_range(d->fd, 0, 0, SYNC_FILE_RANGE_WRITE);
#else
	(void)d;
#endif
}

int
vdsk_flush(vdsk_t *d)
{
	int r;

	if (d->flags & VDSK_RDONLY)
		return 0;
	if (d->ops->threadsafe)
		return d->ops->flush(d);
	vdsk_meta_lock(d);
	r = d->ops->flush(d);
	vdsk_meta_unlock(d);
	return r;
}

int
vdsk_info(vdsk_t *d, struct vdsk_info *info)
{
	struct stat st;

	memset(info, 0, sizeof(*info));
	snprintf(info->format, sizeof(info->format), "%s", d->ops->name);
	info->virtual_size = d->size;
	snprintf(info->backing_file, sizeof(info->backing_file), "%s",
	    d->backing_file);
	snprintf(info->backing_format, sizeof(info->backing_format), "%s",
	    d->backing_fmt);
	if (fstat(d->fd, &st) < 0)
		return vdsk_error(errno, "%s: %s", d->path, strerror(errno));
	info->actual_size = (uint64_t)st.st_blocks * 512;
	if (d->ops->info != NULL) {
		vdsk_meta_lock(d);
		d->ops->info(d, info);
		vdsk_meta_unlock(d);
	}
	return 0;
}

int
vdsk_create(const char *path, const char *fmt, uint64_t size,
    const char *backing, const char *backing_fmt, uint32_t cluster_size)
{
	return vdsk_create_subformat(path, fmt, NULL, size, backing,
	    backing_fmt, cluster_size);
}

int
vdsk_create_subformat(const char *path, const char *fmt,
    const char *subformat, uint64_t size, const char *backing,
    const char *backing_fmt, uint32_t cluster_size)
{
	const struct vdsk_ops *ops;

	last_err = 0;
	last_msg[0] = '\0';
	if (path == NULL || path[0] == '\0')
		return vdsk_error(EINVAL, "empty image path");
	if (fmt == NULL || (ops = find_ops(fmt)) == NULL)
		return vdsk_error(ENOTSUP, "%s: cannot create format '%s'",
		    path, fmt ? fmt : "(null)");
	if (backing != NULL && backing[0] == '\0')
		backing = NULL;
	if (backing_fmt != NULL && backing_fmt[0] == '\0')
		backing_fmt = NULL;
	if (backing == NULL && backing_fmt != NULL)
		return vdsk_error(EINVAL, "%s: backing format without a "
		    "backing file", path);
	if (size > (uint64_t)INT64_MAX)
		return vdsk_error(EFBIG, "%s: size too large", path);
	if (subformat != NULL && subformat[0] == '\0')
		subformat = NULL;
	if (subformat != NULL && ops->create_subformat == NULL)
		return vdsk_error(EINVAL, "%s: format '%s' has no subformats",
		    path, fmt);
	if (ops->create_subformat != NULL)
		return ops->create_subformat(path, size, backing, backing_fmt,
		    cluster_size, subformat);
	return ops->create(path, size, backing, backing_fmt, cluster_size);
}

/* ---- discard, resize, compressed writes, snapshots, check ---- */

static int
need_rw(vdsk_t *d)
{
	if (d->flags & VDSK_RDONLY)
		return vdsk_error(EROFS, "%s: image is open read-only",
		    d->path);
	return 0;
}

static int
unsupported(vdsk_t *d, const char *what)
{
	return vdsk_error(ENOTSUP, "%s: %s is not supported for %s images",
	    d->path, what, d->ops->name);
}

int
vdsk_discard(vdsk_t *d, uint64_t off, uint64_t len)
{
	struct vdsk_rl_entry e;
	int r;

	if ((r = need_rw(d)) < 0)
		return r;
	if ((r = range_begin(d, &e, off, len, 1)) < 0)
		return r;
	if (off > d->size || len > d->size - off)
		r = vdsk_error(EINVAL, "%s: discard range beyond the "
		    "virtual size", d->path);
	else if (d->ops->discard != NULL && len > 0)
		r = d->ops->discard(d, off, len);
	range_end(d, &e);
	return r;
}

int
vdsk_resize(vdsk_t *d, uint64_t size)
{
	struct vdsk_rl_entry e;
	int r;

	if ((r = need_rw(d)) < 0)
		return r;
	if (size > (uint64_t)INT64_MAX)
		return vdsk_error(EFBIG, "%s: size too large", d->path);
	if (d->ops->resize == NULL)
		return unsupported(d, "resize");
	excl_begin(d, &e);
	r = d->ops->resize(d, size);
	range_end(d, &e);
	return r;
}

int
vdsk_write_compressed(vdsk_t *d, const void *buf, uint64_t off, size_t len)
{
	struct vdsk_rl_entry e;
	int r;

	if ((r = need_rw(d)) < 0)
		return r;
	if (d->ops->write_compressed == NULL)
		return unsupported(d, "compression");
	if ((r = range_begin(d, &e, off, len, 1)) < 0)
		return r;
	if (off > d->size || len > d->size - off)
		r = vdsk_error(EINVAL, "%s: range beyond the virtual size",
		    d->path);
	else
		r = d->ops->write_compressed(d, buf, off, len);
	range_end(d, &e);
	return r;
}

static int
snapshot_op(vdsk_t *d, int op, const char *name, struct vdsk_snapshot *out,
    int max)
{
	struct vdsk_rl_entry e;
	int r;

	last_err = 0;
	last_msg[0] = '\0';
	if (op != VDSK_SNAP_LIST && (r = need_rw(d)) < 0)
		return r;
	if (op != VDSK_SNAP_LIST && (name == NULL || name[0] == '\0'))
		return vdsk_error(EINVAL, "%s: empty snapshot name", d->path);
	if (d->ops->snapshot == NULL)
		return op == VDSK_SNAP_LIST ? 0 : unsupported(d,
		    "internal snapshots");
	if (op == VDSK_SNAP_LIST) {
		/* the driver takes d->meta; no I/O needs to stop */
		if (!d->ops->threadsafe)
			vdsk_meta_lock(d);
		r = d->ops->snapshot(d, op, name, out, max);
		if (!d->ops->threadsafe)
			vdsk_meta_unlock(d);
		return r;
	}
	excl_begin(d, &e);
	r = d->ops->snapshot(d, op, name, out, max);
	range_end(d, &e);
	return r;
}

int
vdsk_snapshot_create(vdsk_t *d, const char *name)
{
	return snapshot_op(d, VDSK_SNAP_CREATE, name, NULL, 0);
}

int
vdsk_snapshot_list(vdsk_t *d, struct vdsk_snapshot *out, int max)
{
	return snapshot_op(d, VDSK_SNAP_LIST, NULL, out, max < 0 ? 0 : max);
}

int
vdsk_snapshot_apply(vdsk_t *d, const char *name)
{
	return snapshot_op(d, VDSK_SNAP_APPLY, name, NULL, 0);
}

int
vdsk_snapshot_delete(vdsk_t *d, const char *name)
{
	return snapshot_op(d, VDSK_SNAP_DELETE, name, NULL, 0);
}

int
vdsk_check(const char *path, const char *fmt, int flags,
    struct vdsk_check *res)
{
	vdsk_t *d;
	int r;

	last_err = 0;
	last_msg[0] = '\0';
	memset(res, 0, sizeof(*res));
	if (flags & ~VDSK_CHECK_REPAIR_LEAKS)
		return vdsk_error(EINVAL, "unknown check flags %#x", flags);
	d = vdsk_open_internal(path, fmt, VDSK_NO_BACKING | VDSK_OPEN_CHECK |
	    ((flags & VDSK_CHECK_REPAIR_LEAKS) ? 0 : VDSK_RDONLY), 0, NULL);
	if (d == NULL)
		return -vdsk_errno();
	r = 0;
	if (d->ops->check != NULL) {
		struct vdsk_rl_entry e;

		excl_begin(d, &e);
		r = d->ops->check(d, flags, res);
		range_end(d, &e);
	}
	if (r < 0) {
		vdsk_close(d);
		return r;
	}
	return vdsk_close(d);
}
