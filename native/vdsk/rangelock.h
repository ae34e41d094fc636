/*
 * Range locks: concurrent I/O on one open image.  A request locks the byte
 * range [off, off + len) shared (reads) or exclusive (writes).  Requests
 * whose ranges overlap, with at least one exclusive, run one after the
 * other in arrival order (FIFO, so writers do not starve); all others run
 * in parallel.  Entries live on the caller's stack.
 */
#ifndef VDSK_RANGELOCK_H
#define VDSK_RANGELOCK_H

#include <pthread.h>
#include <stdint.h>

struct vdsk_rl_entry {
	uint64_t start, end;            /* [start, end) */
	int excl;
	int granted;
	struct vdsk_rl_entry *prev, *next;
};

struct vdsk_rangelock {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	struct vdsk_rl_entry *head, *tail;      /* arrival order */
};

int vdsk_rl_init(struct vdsk_rangelock *rl);
void vdsk_rl_destroy(struct vdsk_rangelock *rl);
/* Block until [off, off + len) is ours; len 0 locks nothing. */
void vdsk_rl_lock(struct vdsk_rangelock *rl, struct vdsk_rl_entry *e,
    uint64_t off, uint64_t len, int excl);
void vdsk_rl_unlock(struct vdsk_rangelock *rl, struct vdsk_rl_entry *e);

#endif /* VDSK_RANGELOCK_H */
