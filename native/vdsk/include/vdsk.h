/*
 * libvdsk: virtual disk images (raw, qcow2, vmdk, vdi, vpc/vhd).
 *
 * Conventions: functions returning int give 0 on success and a negative
 * errno value on failure; vdsk_open() returns NULL on failure.  After any
 * failure, vdsk_errno() and vdsk_errmsg() describe it.  They are
 * thread-local, so read them from the thread that made the failing call.
 *
 * Threads: vdsk_read/write/flush/info/block_status may be called on one
 * vdsk_t from many threads at once.  Requests on disjoint ranges run in
 * parallel, overlapping ones (with at least one write) one after the other
 * (range locks, see rangelock.h); each request is atomic with respect to
 * the others.  vdsk_close() must not race with anything.
 */
#ifndef VDSK_H
#define VDSK_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * cffi cdef begin: native/vdsk_build.py hands the text from here to "cdef
 * end" to cffi as the binding's declarations.  So in between: no
 * preprocessor lines but #define NAME <integer>.
 */
typedef struct vdsk vdsk_t;

/* vdsk_open() flags */
#define VDSK_RDONLY     0x1     /* open read-only */
#define VDSK_NO_BACKING 0x2     /* do not open the backing file (info only) */

#define VDSK_FMT_MAX     32
#define VDSK_PATH_MAX    1024

struct vdsk_info {
	char format[VDSK_FMT_MAX];          /* "raw", "qcow2", "vmdk", ... */
	uint64_t virtual_size;              /* bytes */
	uint32_t cluster_size;              /* 0 if the format has none */
	uint32_t version;                   /* format version, 0 if none */
	char backing_file[VDSK_PATH_MAX];   /* "" if none; as stored */
	char backing_format[VDSK_FMT_MAX];  /* "" if not recorded */
	uint64_t actual_size;               /* bytes allocated on the host */
	int dirty;                          /* qcow2 dirty/corrupt flags set */
	uint32_t nb_snapshots;              /* internal snapshots */
};

/*
 * Create an image.  fmt is "raw", "qcow2", "vmdk", "vdi" or "vpc" ("vhd").
 * backing/backing_fmt are qcow2 only; a relative backing path is relative
 * to the new image's directory.  size 0 with a backing file means "the
 * backing file's size".  cluster_size 0 means the format's default (qcow2:
 * 64 KiB, a power of two in 512..2M; the others accept only their fixed
 * size).  An existing file at path is truncated.
 */
int vdsk_create(const char *path, const char *fmt, uint64_t size,
    const char *backing, const char *backing_fmt, uint32_t cluster_size);

/*
 * vdsk_create() with a subformat (NULL or "" = the format's default):
 *   vmdk  "monolithicSparse" (the only one created; 64 KiB grains)
 *   vdi   "dynamic" (default) or "static" (alias "fixed"); 1 MiB blocks
 *   vpc   "dynamic" (default, 2 MiB blocks) or "fixed"; "vhd" is an
 *         alias of "vpc".  The size is rounded up to a CHS geometry
 *         like qemu-img create -f vpc (force_size=off).
 * vmdk, vdi and vpc images have no backing file here.
 */
int vdsk_create_subformat(const char *path, const char *fmt,
    const char *subformat, uint64_t size, const char *backing,
    const char *backing_fmt, uint32_t cluster_size);

/* fmt NULL probes the format from the file's magic. */
vdsk_t *vdsk_open(const char *path, const char *fmt, int flags);
int vdsk_close(vdsk_t *d);

uint64_t vdsk_size(const vdsk_t *d);
int vdsk_read(vdsk_t *d, void *buf, uint64_t off, size_t len);
int vdsk_write(vdsk_t *d, const void *buf, uint64_t off, size_t len);
int vdsk_flush(vdsk_t *d);
int vdsk_info(vdsk_t *d, struct vdsk_info *info);

/* Open options (vdsk_open2); zero fields mean defaults. */
struct vdsk_open_opts {
	uint64_t l2_cache_size;     /* bytes of L2 table cache (qcow2: 4 MiB) */
};

vdsk_t *vdsk_open2(const char *path, const char *fmt, int flags,
    const struct vdsk_open_opts *opts);

/*
 * Allocation status of guest ranges (this image only, not its backing):
 * returns one of the values below for the run starting at off and sets
 * *pnum to its length (0 < *pnum <= len), or a negative errno.  Formats
 * that cannot tell report everything as data.
 */
#define VDSK_BS_DATA        1   /* allocated here, holds data */
#define VDSK_BS_ZERO        2   /* allocated here, reads as zeroes */
#define VDSK_BS_UNALLOCATED 3   /* reads from the backing file (or zero) */
int vdsk_block_status(vdsk_t *d, uint64_t off, uint64_t len, uint64_t *pnum);

/*
 * Copy src into a new image dst (replaced if it exists).  Ranges that are
 * unallocated in the whole chain or read as zeroes are not written, so the
 * destination is sparse.  The result has no backing file.
 */
#define VDSK_CONVERT_COMPRESS 0x1   /* compressed clusters (qcow2) */
/* Return without flushing dst to stable storage (qemu-img convert's
 * default "-t unsafe"); by default vdsk_convert() ends with an fsync. */
#define VDSK_CONVERT_NO_FLUSH 0x2
/* Copy the source's plain extents (raw, uncompressed qcow2 clusters) with
 * copy_file_range, zero granules found by probing: a block clone on file
 * systems that share extents (XFS, btrfs).  Without it the data goes
 * through the job buffer (pread, zero check, pwrite), which is faster
 * where copy_file_range is a page-cache copy (ext4: bench/RESULTS-vdsk-
 * convert.md). */
#define VDSK_CONVERT_COPY_RANGE 0x4
struct vdsk_convert_opts {
	int workers;                /* copy threads; 0: 1 (2 compressed) */
	uint32_t buf_size;          /* bytes per I/O; 0: 8 MiB */
	uint32_t cluster_size;      /* destination cluster size; 0: default */
	int flags;                  /* VDSK_CONVERT_* */
};
int vdsk_convert(const char *src, const char *src_fmt, const char *dst,
    const char *dst_fmt, const struct vdsk_convert_opts *opts);

/*
 * Write the data allocated in the image at path into its backing file
 * (which must be at least as large).  The overlay is left unchanged.
 */
int vdsk_commit(const char *path, const char *fmt);

/*
 * Make backing (format backing_fmt, probed if NULL; NULL or "" backing:
 * none) the backing file of the image at path.  Safe mode first copies
 * into the image every cluster whose contents would change, so the guest
 * view is unchanged; unsafe mode only rewrites the header.
 */
int vdsk_rebase(const char *path, const char *fmt, const char *backing,
    const char *backing_fmt, int unsafe);

/*
 * A qemu-img bench equivalent: 'count' requests of 'bs' bytes, by
 * 'threads' threads (each request synchronous).  Sequential requests
 * start at 'offset' and advance by 'step' (0: bs), wrapping at the end
 * of the image like qemu-img; random requests are bs-aligned.
 */
struct vdsk_bench_opts {
	int write;
	int random;
	int threads;                /* 0: 1 */
	uint32_t bs;                /* 0: 4096 */
	uint64_t count;             /* 0: 75000 */
	uint64_t offset;
	uint64_t step;
	uint64_t seed;
	int flush_interval;         /* write: flush every n requests, 0 never */
};
struct vdsk_bench_result {
	double seconds;
	uint64_t requests;
	uint64_t bytes;
};
int vdsk_bench(const char *path, const char *fmt,
    const struct vdsk_bench_opts *opts, struct vdsk_bench_result *res);

/*
 * Free whole clusters in [off, off+len) (partial clusters are left as
 * they are); they read as zeroes afterwards (qcow2; raw: no-op).
 */
int vdsk_discard(vdsk_t *d, uint64_t off, uint64_t len);

/* Change the virtual size; a qcow2 shrink needs an unallocated tail. */
int vdsk_resize(vdsk_t *d, uint64_t size);

/*
 * Write one whole cluster compressed (qcow2): off cluster aligned, len
 * the cluster size (or the rest of the disk for the last cluster).
 */
int vdsk_write_compressed(vdsk_t *d, const void *buf, uint64_t off,
    size_t len);

/* Internal snapshots (qcow2).  name matches a snapshot's id or name. */
struct vdsk_snapshot {
	char id[128];
	char name[256];
	uint64_t vm_state_size;
	uint64_t disk_size;
	int64_t date_sec;
	uint32_t date_nsec;
	uint64_t vm_clock_nsec;
};

int vdsk_snapshot_create(vdsk_t *d, const char *name);
/* Returns the number of snapshots; fills up to max entries of out. */
int vdsk_snapshot_list(vdsk_t *d, struct vdsk_snapshot *out, int max);
int vdsk_snapshot_apply(vdsk_t *d, const char *name);
int vdsk_snapshot_delete(vdsk_t *d, const char *name);

/* Consistency check, like qemu-img check (qcow2; raw is always clean). */
#define VDSK_CHECK_REPAIR_LEAKS 0x1

struct vdsk_check {
	uint64_t corruptions;           /* remaining after repair */
	uint64_t leaks;                 /* remaining after repair */
	uint64_t corruptions_fixed;
	uint64_t leaks_fixed;
	uint64_t allocated_clusters;
	uint64_t total_clusters;
};

int vdsk_check(const char *path, const char *fmt, int flags,
    struct vdsk_check *res);

int vdsk_errno(void);
const char *vdsk_errmsg(void);
/* cffi cdef end */

#ifdef __cplusplus
}
#endif

#endif /* VDSK_H */
