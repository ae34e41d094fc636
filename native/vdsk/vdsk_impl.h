/* libvdsk internals shared by the format drivers.  Not installed. */
#ifndef VDSK_IMPL_H
#define VDSK_IMPL_H

#include <sys/types.h>
#include <pthread.h>
#include <stdint.h>
#include <stddef.h>

#include "vdsk.h"
#include "vdsk_endian.h"
#include "rangelock.h"

#define VDSK_MAX_CHAIN 16       /* backing chain depth limit */

struct vdsk;

struct vdsk_ops {
	const char *name;
	/* d->fd, d->flags, d->file_size are set; fill d->size and friends. */
	int (*open)(struct vdsk *d);
	void (*close)(struct vdsk *d);
	int (*read)(struct vdsk *d, void *buf, uint64_t off, size_t len);
	int (*write)(struct vdsk *d, const void *buf, uint64_t off,
	    size_t len);
	int (*flush)(struct vdsk *d);
	int (*create)(const char *path, uint64_t size, const char *backing,
	    const char *backing_fmt, uint32_t cluster_size);
	void (*info)(struct vdsk *d, struct vdsk_info *info);
	/* optional */
	int (*discard)(struct vdsk *d, uint64_t off, uint64_t len);
	int (*resize)(struct vdsk *d, uint64_t size);
	int (*write_compressed)(struct vdsk *d, const void *buf, uint64_t off,
	    size_t len);
	int (*snapshot)(struct vdsk *d, int op, const char *name,
	    struct vdsk_snapshot *out, int max);
	int (*check)(struct vdsk *d, int flags, struct vdsk_check *res);
	/* optional: create with a subformat (NULL = the default one) */
	int (*create_subformat)(const char *path, uint64_t size,
	    const char *backing, const char *backing_fmt,
	    uint32_t cluster_size, const char *subformat);
	/*
	 * Optional (NULL: every range is VDSK_BS_DATA).  Status of the range
	 * starting at off (len > 0, within the virtual size): returns a
	 * VDSK_BS_* value and sets *pnum to the length (> 0, <= len) of the
	 * run that has it, or a negative errno.
	 */
	int (*block_status)(struct vdsk *d, uint64_t off, uint64_t len,
	    uint64_t *pnum);
	/*
	 * Optional: rewrite the backing file name and format in the image
	 * header (backing NULL: remove it).  Data is not touched.
	 */
	int (*set_backing)(struct vdsk *d, const char *backing,
	    const char *backing_fmt);
	/*
	 * Optional, for convert's in-kernel copy.  host_extent: is guest
	 * range [off, off+len) (len > 0, within the virtual size) stored as
	 * plain bytes in d->fd?  Returns 1 and sets *host to the file offset
	 * of off, or 0 (compressed, zero, unallocated...: read it with
	 * read); either way *pnum is the length (> 0, <= len) of the run.
	 * copy_in: write guest range [off, off+len) of d with the len bytes
	 * of file sfd at soff (see vdsk_copy_file); called under the range
	 * lock like write.
	 */
	int (*host_extent)(struct vdsk *d, uint64_t off, uint64_t len,
	    uint64_t *host, uint64_t *pnum);
	int (*copy_in)(struct vdsk *d, uint64_t off, size_t len, int sfd,
	    uint64_t soff);
	/*
	 * Set if read/write may run concurrently on disjoint ranges (the
	 * driver takes vdsk_meta_lock() around its metadata work, also in
	 * discard, write_compressed, resize, snapshot, check and
	 * block_status; info is called with it held).  The common layer
	 * range-locks requests: read/write/discard/write_compressed their
	 * clusters, resize/snapshot changes/check the whole image.  Drivers
	 * without the flag are also serialised as a whole under d->meta.
	 */
	int threadsafe;
};

/* snapshot ops */
#define VDSK_SNAP_CREATE        0
#define VDSK_SNAP_LIST          1
#define VDSK_SNAP_APPLY         2
#define VDSK_SNAP_DELETE        3

/* internal open flag: open for vdsk_check (dirty images allowed) */
#define VDSK_OPEN_CHECK         0x1000

struct vdsk {
	const struct vdsk_ops *ops;
	int fd;
	int flags;
	int depth;                      /* 0 for the top image */
	char *path;
	uint64_t size;                  /* virtual size */
	uint64_t file_size;             /* host file size at open */
	dev_t dev;
	ino_t ino;
	const struct vdsk *child;       /* image whose backing we are */
	char backing_file[VDSK_PATH_MAX];
	char backing_fmt[VDSK_FMT_MAX];
	struct vdsk *backing;
	void *priv;
	/* concurrency (see rangelock.h) */
	pthread_mutex_t meta;           /* driver metadata, or whole driver */
	struct vdsk_rangelock rl;       /* guest ranges in use */
	uint64_t lock_align;            /* range lock granularity (cluster) */
	uint64_t l2_cache_bytes;        /* open option; 0: driver default */
};

/* Metadata lock of a thread-safe driver (no-ops would be wrong: the
 * common layer already holds it around non-thread-safe drivers). */
static inline void vdsk_meta_lock(struct vdsk *d)
{
	pthread_mutex_lock(&d->meta);
}

static inline void vdsk_meta_unlock(struct vdsk *d)
{
	pthread_mutex_unlock(&d->meta);
}

extern const struct vdsk_ops vdsk_raw_ops;
extern const struct vdsk_ops vdsk_qcow2_ops;
extern const struct vdsk_ops vdsk_vmdk_ops;
extern const struct vdsk_ops vdsk_vdi_ops;
extern const struct vdsk_ops vdsk_vpc_ops;        /* VHD */

/* qcow2_rebase.c: the qcow2 set_backing op. */
int vdsk_qcow2_set_backing(struct vdsk *d, const char *backing,
    const char *backing_fmt);

/* Record the error for vdsk_errno()/vdsk_errmsg(); returns -err. */
int vdsk_error(int err, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#if defined(__linux__)
#define VDSK_HAVE_COPY_FILE_RANGE 1
#elif defined(__FreeBSD__)
#include <sys/param.h>
#if __FreeBSD_version >= 1300037
#define VDSK_HAVE_COPY_FILE_RANGE 1
#endif
#endif

/* Start writing d's dirty pages back to the disk, without waiting
 * (Linux sync_file_range; a no-op elsewhere). */
void vdsk_start_writeback(struct vdsk *d);

/* Full pread of any fd: 0, -errno, or -EIO at the end of the file
 * (records no error message: the caller says what was read). */
int vdsk_read_fd(int fd, void *buf, size_t len, uint64_t off);

/* Copy len bytes of file sfd at soff to d->fd at doff, in the kernel
 * where it can (copy_file_range), else through a bounce buffer. */
int vdsk_copy_file(struct vdsk *d, int sfd, uint64_t soff, uint64_t doff,
    size_t len, const char *what);

/* The host_extent op (0 and *pnum = len for drivers without it); takes
 * the metadata lock around drivers that are not thread-safe. */
int vdsk_host_extent(struct vdsk *d, uint64_t off, uint64_t len,
    uint64_t *host, uint64_t *pnum);

/* Range-locked copy_in op: guest [off, off+len) of d := sfd[soff...];
 * without the op, through a bounce buffer and the write op. */
int vdsk_copy_in(struct vdsk *d, uint64_t off, size_t len, int sfd,
    uint64_t soff);

/* Full-length pread/pwrite; a read past end of file is -EIO. */
int vdsk_pread(struct vdsk *d, void *buf, size_t len, uint64_t off,
    const char *what);
int vdsk_pwrite(struct vdsk *d, const void *buf, size_t len, uint64_t off,
    const char *what);

/*
 * Open the backing file named in d->backing_file / d->backing_fmt (if any,
 * and unless VDSK_NO_BACKING), checking depth and loops.
 */
int vdsk_open_backing(struct vdsk *d);

/* Read from d's backing file; zeroes where there is none or it is short.
 * Safe to call concurrently (serialises non-thread-safe backing drivers). */
int vdsk_read_backing(struct vdsk *d, void *buf, uint64_t off, size_t len);

/* Open with internal flags, for create paths and backing chains. */
struct vdsk *vdsk_open_internal(const char *path, const char *fmt,
    int flags, int depth, const struct vdsk *child);

/* Resolve a backing name relative to the image at 'image_path'. */
char *vdsk_backing_path(const char *image_path, const char *backing);

/* Probe a format name from the file contents ("raw" if no magic matches). */
int vdsk_probe_fd(int fd, const char **name);

#endif /* VDSK_IMPL_H */
