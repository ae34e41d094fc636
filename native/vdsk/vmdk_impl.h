/* libvdsk VMDK internals shared by vmdk.c and vmdk_desc.c.  Not installed. */
#ifndef VMDK_IMPL_H
#define VMDK_IMPL_H

#include <stddef.h>
#include <stdint.h>

#include "vdsk_impl.h"

enum { VMDK_SPARSE = 1, VMDK_STREAM, VMDK_FLAT };

#define VMDK_MAX_EXTENTS 64

struct vmdk_extent {
	uint64_t start;                 /* first virtual byte */
	uint64_t len;                   /* bytes */
	uint64_t offset;                /* byte offset in the extent file */
	int fd;                         /* -1: ZERO extent */
	int writable;
};

struct vmdk_desc {
	char create_type[64];
	char parent[VDSK_PATH_MAX];     /* parentFileNameHint */
	struct vmdk_extent ext[VMDK_MAX_EXTENTS];
	unsigned n;
};

/*
 * Parse descriptor text (NUL-terminated, changed in place).  Embedded
 * descriptors only record createType and the parent; a descriptor file
 * also gets its extents checked and opened (vmdk_desc_open).
 */
int vmdk_desc_parse(struct vdsk *d, struct vmdk_desc *desc, char *text,
    int embedded);
/* Read d's descriptor file and open its extents; sets d->size. */
int vmdk_desc_open(struct vdsk *d, struct vmdk_desc *desc, size_t max);
int vmdk_desc_io(struct vdsk *d, struct vmdk_desc *desc, void *buf,
    uint64_t off, size_t len, int write);
int vmdk_desc_flush(struct vdsk *d, struct vmdk_desc *desc);
void vmdk_desc_free(struct vmdk_desc *desc);

#endif /* VMDK_IMPL_H */
