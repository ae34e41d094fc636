/*
 * libvdsk: virtual disk images (raw, qcow2, vmdk, vdi, vpc/vhd).
 *
 * Conventions: functions returning int give 0 on success and a negative
 * errno value on failure; vdsk_open() returns NULL on failure.  After any
 * failure, vdsk_errno() and vdsk_errmsg() describe it.  They are
 * thread-local, so read them from the thread that made the failing call.
 *
 * A vdsk_t may be used by one thread at a time.
 */
#ifndef VDSK_H
#define VDSK_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

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

#ifdef __cplusplus
}
#endif

#endif /* VDSK_H */
