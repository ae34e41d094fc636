/* libvdsk qcow2 driver internals, shared by the qcow2*.c files. */
#ifndef VDSK_QCOW2_H
#define VDSK_QCOW2_H

#include "vdsk_impl.h"

#define QCOW2_MAGIC             0x514649fbu
#define HDR_V2_LEN              72
#define HDR_V3_LEN              104
#define HDR_CREATE_LEN          112

#define INCOMPAT_DIRTY          (1ULL << 0)
#define INCOMPAT_CORRUPT        (1ULL << 1)
#define INCOMPAT_DATA_FILE      (1ULL << 2)
#define INCOMPAT_COMPRESSION    (1ULL << 3)
#define INCOMPAT_EXTL2          (1ULL << 4)
#define INCOMPAT_KNOWN          0x1fULL

#define EXT_END                 0x00000000u
#define EXT_BACKING_FMT         0xe2792acau
#define EXT_FEATURES            0x6803f857u

#define OFLAG_COPIED            (1ULL << 63)
#define OFLAG_COMPRESSED        (1ULL << 62)
#define OFLAG_ZERO              1ULL
#define L1E_OFFSET_MASK         0x00fffffffffffe00ULL
#define L1E_RESERVED            0x7f000000000001ffULL
#define L2E_OFFSET_MASK         0x00fffffffffffe00ULL
#define L2E_RESERVED            0x3f000000000001feULL
#define RTE_OFFSET_MASK         0xfffffffffffffe00ULL
#define MAX_HOST_OFFSET         (1ULL << 56)

#define MAX_L1_BYTES            (32u << 20)
#define MAX_RT_BYTES            (8u << 20)
#define MAX_SNAPSHOTS           65536
#define MAX_BACKING_NAME        1023
#define DEFAULT_CLUSTER         65536u

#define CACHE_MAX               64

struct tslot {
	uint64_t off;           /* 0: empty (offset 0 is the header) */
	uint64_t lru;
	uint8_t *data;
};

struct tcache {
	const char *what;
	unsigned n;
	uint64_t tick;
	struct tslot s[CACHE_MAX];
};

struct qcow2 {
	uint32_t version;
	uint32_t cluster_bits;
	uint64_t cs;
	uint32_t l2_bits;               /* log2(entries per L2 table) */
	uint32_t refcount_order;
	uint32_t rb_bits;               /* log2(entries per refcount block) */
	uint32_t header_length;
	uint32_t nb_snapshots;
	uint64_t incompat, compat, autoclear;

	uint64_t *l1;
	uint32_t l1_size;
	uint64_t l1_offset;

	uint64_t *rt;                   /* loaded for writable images only */
	uint64_t rt_entries;
	uint64_t rt_offset;
	uint32_t rt_clusters;

	uint64_t next_free;
	int growing;

	struct tcache l2c, rbc;
	uint8_t *cbuf;                  /* one cluster of scratch (meta lock) */

	/* extended L2 entries (subclusters), compression */
	int extl2;
	uint32_t l2e_size;              /* 8, or 16 with extended L2 */
	uint32_t ctype;                 /* 0 zlib, 1 zstd */
	uint32_t csize_shift;
	uint64_t csize_mask, coff_mask;
	uint8_t *zbuf;                  /* unused: scratch is per call */
	uint8_t *dbuf;                  /* last decompressed cluster (meta) */
	uint64_t dbuf_entry;            /* its L2 entry, 0 if none */
	uint64_t comp_cur;              /* next free byte for compressed data */

	uint64_t free_hint;             /* no free cluster below this index */

	/* internal snapshots */
	uint64_t snap_off;
	uint64_t snap_bytes;            /* serialized size of the table */
	struct qsnap *snaps;
};

struct qsnap {
	uint64_t l1_off;
	uint32_t l1_size;
	char *id, *name;
	uint32_t date_sec, date_nsec;
	uint64_t vm_clock;
	uint32_t vm_state_size;
	uint32_t extra_size;
	uint8_t *extra;                 /* preserved as read */
	uint64_t disk_size;
};

enum ckind { C_UNALLOC, C_ZERO, C_NORMAL, C_COMPRESSED };

#define COMPAT_LAZY_REFCOUNTS   (1ULL << 0)
#define MAX_SNAP_TABLE          (64u << 20)

#define QCOW2_CHECK_REPAIR_ALL  0x100   /* internal: also fix corruptions */

/* qcow2_refcount.c: table caches, refcounts, cluster allocation */
void qcow2_cache_init(struct tcache *c, const char *what, uint64_t cs,
    uint64_t budget);
void qcow2_cache_free(struct tcache *c);
void qcow2_cache_drop(struct tcache *c, uint64_t off);
int qcow2_cache_get(struct vdsk *d, struct tcache *c, uint64_t off, int fresh,
    uint8_t **out);
int qcow2_get_refcount(struct vdsk *d, uint64_t host, uint64_t *val);
int qcow2_set_refcount(struct vdsk *d, uint64_t host, uint64_t val);
int qcow2_alloc_clusters(struct vdsk *d, uint64_t n, uint64_t *off);
int qcow2_load_rt(struct vdsk *d);
/* Add 'addend' to the refcount of every host cluster in [off, off+len). */
int qcow2_update_refcount(struct vdsk *d, uint64_t off, uint64_t len,
    int addend);

/* qcow2.c: header, open, create */
int qcow2_load_table(struct vdsk *d, uint64_t off, uint64_t n, uint64_t **out,
    const char *what);

/* qcow2_cluster.c: guest -> host mapping, reads, writes, growth */
uint64_t qcow2_l1_entries_for(const struct qcow2 *q, uint64_t size);
int qcow2_read(struct vdsk *d, void *buf, uint64_t off, size_t len);
int qcow2_write(struct vdsk *d, const void *buf, uint64_t off, size_t len);
int qcow2_flush(struct vdsk *d);
int qcow2_grow(struct vdsk *d, uint64_t size);
int qcow2_corrupt(struct vdsk *d, const char *what, uint64_t idx,
    uint64_t val);
/* Host range [*off, *off + *len) of the clusters an L2 entry holds. */
void qcow2_entry_range(const struct qcow2 *q, uint64_t e, uint64_t *off,
    uint64_t *len);
int qcow2_entry_kind(struct vdsk *d, uint64_t e, enum ckind *k);
int qcow2_write_l1_entry(struct vdsk *d, uint64_t l1i);
int qcow2_discard(struct vdsk *d, uint64_t off, uint64_t len);
int qcow2_resize(struct vdsk *d, uint64_t size);
int qcow2_write_compressed(struct vdsk *d, const void *buf, uint64_t off,
    size_t len);
int qcow2_block_status(struct vdsk *d, uint64_t off, uint64_t len,
    uint64_t *pnum);
int qcow2_copy_in(struct vdsk *d, uint64_t off, size_t len, int sfd,
    uint64_t soff);
int qcow2_host_extent(struct vdsk *d, uint64_t off, uint64_t len,
    uint64_t *host, uint64_t *pnum);

/* qcow2_snapshot.c */
int qcow2_snap_load(struct vdsk *d, uint32_t nb, uint64_t off);
void qcow2_snap_free(struct qcow2 *q);
/* Walk an L1 table: refcounts += addend; fix OFLAG_COPIED if active. */
int qcow2_update_l1_refs(struct vdsk *d, uint64_t *l1, uint32_t l1_size,
    int addend, int active);
int qcow2_snapshot(struct vdsk *d, int op, const char *name,
    struct vdsk_snapshot *out, int max);

/* qcow2_check.c */
int qcow2_check(struct vdsk *d, int flags, struct vdsk_check *res);

#endif /* VDSK_QCOW2_H */
