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
	uint8_t *cbuf;                  /* one cluster of scratch */
};

enum ckind { C_UNALLOC, C_ZERO, C_NORMAL, C_COMPRESSED };

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

/* qcow2.c: header, open, create */
int qcow2_load_table(struct vdsk *d, uint64_t off, uint64_t n, uint64_t **out,
    const char *what);

/* qcow2_cluster.c: guest -> host mapping, reads, writes, growth */
uint64_t qcow2_l1_entries_for(const struct qcow2 *q, uint64_t size);
int qcow2_read(struct vdsk *d, void *buf, uint64_t off, size_t len);
int qcow2_write(struct vdsk *d, const void *buf, uint64_t off, size_t len);
int qcow2_flush(struct vdsk *d);
int qcow2_grow(struct vdsk *d, uint64_t size);

#endif /* VDSK_QCOW2_H */
