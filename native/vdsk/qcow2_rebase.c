/*
 * libvdsk qcow2: change the backing file recorded in the header (the
 * set_backing op behind vdsk_rebase).  Header extensions other than the
 * backing format are kept; the new name follows them in cluster 0, which
 * is rewritten with a single write.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vdsk_impl.h"

#define EXT_END         0x00000000u
#define EXT_BACKING_FMT 0xe2792acau

int
vdsk_qcow2_set_backing(struct vdsk *d, const char *backing,
    const char *backing_fmt)
{
	uint8_t h[104], *old, *nw;
	uint32_t cb, cs, hlen, bfs, off, end, no, blen = 0, flen = 0;
	uint64_t bfo;
	int r;

	if ((r = vdsk_pread(d, h, sizeof(h), 0, "header")) < 0)
		return r;
	cb = be32_get(h + 20);
	cs = 1u << cb;
	hlen = be32_get(h + 4) >= 3 ? be32_get(h + 100) : 72;
	bfo = be64_get(h + 8);
	bfs = be32_get(h + 16);
	end = bfo ? (uint32_t)bfo + bfs : cs;
	if (backing != NULL) {
		blen = (uint32_t)strlen(backing);
		flen = backing_fmt ? (uint32_t)strlen(backing_fmt) : 0;
		if (blen > 1023 || flen >= VDSK_FMT_MAX)
			return vdsk_error(ENAMETOOLONG, "%s: backing file name "
			    "too long", d->path);
	}
	old = calloc(1, cs);
	nw = calloc(1, cs);
	if (old == NULL || nw == NULL) {
		free(old);
		free(nw);
		return vdsk_error(ENOMEM, "out of memory");
	}
	r = vdsk_pread(d, old, end < d->file_size ? end : d->file_size, 0,
	    "header cluster");
	if (r < 0)
		goto out;
	memcpy(nw, old, hlen);
	no = hlen;
	for (off = hlen; off + 8 <= (bfo ? (uint32_t)bfo : cs);) {
		uint32_t type = be32_get(old + off), len = be32_get(old + off + 4);
		uint32_t sz = 8 + ((len + 7) & ~7u);

		if (type == EXT_END)
			break;
		if (len > cs - off - 8) {
			r = vdsk_error(EINVAL, "%s: corrupt header extension",
			    d->path);
			goto out;
		}
		if (type != EXT_BACKING_FMT) {
			memcpy(nw + no, old + off, sz);
			no += sz;
		}
		off += sz;
	}
	if (flen > 0) {
		be32_put(nw + no, EXT_BACKING_FMT);
		be32_put(nw + no + 4, flen);
		memcpy(nw + no + 8, backing_fmt, flen);
		no += 8 + ((flen + 7) & ~7u);
	}
	no += 8;                                /* end of extensions */
	if (no + blen > cs) {
		r = vdsk_error(ENAMETOOLONG, "%s: backing file name does not "
		    "fit in the header cluster", d->path);
		goto out;
	}
	be64_put(nw + 8, blen ? no : 0);
	be32_put(nw + 16, blen);
	if (blen > 0)           /* memcpy(NULL, 0) would let gcc assume */
		memcpy(nw + no, backing, blen);
	no += blen;
	if ((r = vdsk_pwrite(d, nw, no > end ? no : end, 0, "header")) < 0)
		goto out;
	if (fsync(d->fd) < 0) {
		r = vdsk_error(errno, "%s: fsync: %s", d->path, strerror(errno));
		goto out;
	}
	snprintf(d->backing_file, sizeof(d->backing_file), "%s",
	    backing ? backing : "");
	snprintf(d->backing_fmt, sizeof(d->backing_fmt), "%s",
	    backing && backing_fmt ? backing_fmt : "");
out:
	free(old);
	free(nw);
	return r;
}
