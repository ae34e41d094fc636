/* Range locks for concurrent I/O on one image: see rangelock.h. */
#include <stddef.h>

#include "rangelock.h"

int
vdsk_rl_init(struct vdsk_rangelock *rl)
{
	int r;

	rl->head = rl->tail = NULL;
	if ((r = pthread_mutex_init(&rl->mu, NULL)) != 0)
		return -r;
	if ((r = pthread_cond_init(&rl->cv, NULL)) != 0) {
		pthread_mutex_destroy(&rl->mu);
		return -r;
	}
	return 0;
}

void
vdsk_rl_destroy(struct vdsk_rangelock *rl)
{
	pthread_cond_destroy(&rl->cv);
	pthread_mutex_destroy(&rl->mu);
}

static int
conflicts(const struct vdsk_rl_entry *a, const struct vdsk_rl_entry *b)
{
	return (a->excl || b->excl) && a->start < b->end && b->start < a->end;
}

/* May e run?  Only requests that arrived earlier can hold it back. */
static int
blocked(const struct vdsk_rl_entry *e)
{
	const struct vdsk_rl_entry *p;

	for (p = e->prev; p != NULL; p = p->prev)
		if (conflicts(p, e))
			return 1;
	return 0;
}

void
vdsk_rl_lock(struct vdsk_rangelock *rl, struct vdsk_rl_entry *e,
    uint64_t off, uint64_t len, int excl)
{
	e->start = off;
	e->end = off + len < off ? UINT64_MAX : off + len;
	e->excl = excl;
	e->granted = 0;
	e->next = NULL;
	if (len == 0)
		return;
	pthread_mutex_lock(&rl->mu);
	e->prev = rl->tail;
	if (rl->tail != NULL)
		rl->tail->next = e;
	else
		rl->head = e;
	rl->tail = e;
	while (blocked(e))
		pthread_cond_wait(&rl->cv, &rl->mu);
	e->granted = 1;
	pthread_mutex_unlock(&rl->mu);
}

void
vdsk_rl_unlock(struct vdsk_rangelock *rl, struct vdsk_rl_entry *e)
{
	if (!e->granted)
		return;
	pthread_mutex_lock(&rl->mu);
	if (e->prev != NULL)
		e->prev->next = e->next;
	else
		rl->head = e->next;
	if (e->next != NULL)
		e->next->prev = e->prev;
	else
		rl->tail = e->prev;
	e->granted = 0;
	pthread_cond_broadcast(&rl->cv);
	pthread_mutex_unlock(&rl->mu);
}
