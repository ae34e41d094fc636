/*
 * libvdsk VMDK descriptors: the text that names a VMDK's extents, embedded
 * in a sparse extent or as a file of its own (monolithicFlat).
 *
 * A descriptor is untrusted: extent names must be plain file names in the
 * descriptor's own directory (no '/', not "." or ".."), are opened without
 * following symlinks and must be regular files.  Only FLAT and ZERO
 * extents are supported in descriptor files.
 */
#define _GNU_SOURCE
#include <sys/stat.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vmdk_impl.h"

static char *
trim(char *s)
{
	char *e;

	while (*s == ' ' || *s == '\t')
		s++;
	e = s + strlen(s);
	while (e > s && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\r'))
		*--e = '\0';
	return s;
}

static char *
unquote(char *s)
{
	size_t n = strlen(s);

	if (n >= 2 && s[0] == '"' && s[n - 1] == '"') {
		s[n - 1] = '\0';
		return s + 1;
	}
	return s;
}

static int
parse_u64(const char **sp, uint64_t *out)
{
	const char *s = *sp;
	uint64_t v = 0;

	if (*s < '0' || *s > '9')
		return -1;
	while (*s >= '0' && *s <= '9') {
		if (v > (UINT64_MAX - 9) / 10)
			return -1;
		v = v * 10 + (uint64_t)(*s - '0');
		s++;
	}
	*sp = s;
	*out = v;
	return 0;
}

static int
open_extent(struct vdsk *d, const char *name, int writable)
{
	const char *slash = strrchr(d->path, '/');
	struct stat st;
	char *p;
	int fd;

	if (name[0] == '\0' || strchr(name, '/') != NULL ||
	    strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
		return vdsk_error(EPERM, "%s: VMDK extent '%s' is not a file in "
		    "the image's directory", d->path, name);
	if (slash == NULL) {
		p = strdup(name);
	} else if ((p = malloc((size_t)(slash - d->path) + 2 +
	    strlen(name))) != NULL) {
		memcpy(p, d->path, (size_t)(slash - d->path) + 1);
		strcpy(p + (slash - d->path) + 1, name);
	}
	if (p == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	fd = open(p, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NOFOLLOW |
	    O_NONBLOCK);
	free(p);
	if (fd < 0)
		return vdsk_error(errno, "%s: VMDK extent '%s': %s", d->path,
		    name, strerror(errno));
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) ||
	    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) < 0) {
		close(fd);
		return vdsk_error(EINVAL, "%s: VMDK extent '%s' is not a "
		    "regular file", d->path, name);
	}
	return fd;
}

/* "RW 2048 FLAT "name" 0" */
static int
parse_extent(struct vdsk *d, struct vmdk_desc *desc, char *line)
{
	struct vmdk_extent *x;
	const char *s = line;
	char *q, *name;
	uint64_t sectors, off = 0;
	int rw, zero, fd;

	if (strncmp(s, "RW ", 3) == 0) {
		rw = 1;
		s += 3;
	} else if (strncmp(s, "RDONLY ", 7) == 0) {
		rw = 0;
		s += 7;
	} else {
		return vdsk_error(ENOTSUP, "%s: VMDK extent access '%.16s' is "
		    "not supported", d->path, line);
	}
	while (*s == ' ')
		s++;
	if (parse_u64(&s, &sectors) < 0 || sectors == 0 ||
	    sectors > (uint64_t)INT64_MAX / 512)
		return vdsk_error(EINVAL, "%s: bad VMDK extent size", d->path);
	while (*s == ' ')
		s++;
	if (strncmp(s, "FLAT ", 5) == 0) {
		zero = 0;
		s += 5;
	} else if (strncmp(s, "ZERO", 4) == 0 && (s[4] == ' ' ||
	    s[4] == '\0')) {
		zero = 1;
		s += 4;
	} else {
		return vdsk_error(ENOTSUP, "%s: VMDK extent type '%.16s' is not "
		    "supported in a descriptor file (FLAT, ZERO)", d->path, s);
	}
	if (desc->n >= VMDK_MAX_EXTENTS)
		return vdsk_error(EINVAL, "%s: too many VMDK extents", d->path);
	if (d->size > (uint64_t)INT64_MAX - sectors * 512)
		return vdsk_error(EFBIG, "%s: VMDK too large", d->path);
	x = &desc->ext[desc->n];
	x->start = d->size;
	x->len = sectors * 512;
	x->fd = -1;
	x->writable = rw && !zero;
	if (!zero) {
		while (*s == ' ')
			s++;
		if (*s != '"' || (q = strchr(s + 1, '"')) == NULL)
			return vdsk_error(EINVAL, "%s: VMDK extent without a "
			    "quoted file name", d->path);
		name = (char *)s + 1;
		*q = '\0';
		s = q + 1;
		while (*s == ' ')
			s++;
		if (*s != '\0' && (parse_u64(&s, &off) < 0 ||
		    off > (uint64_t)INT64_MAX / 512 - sectors))
			return vdsk_error(EINVAL, "%s: bad VMDK extent offset",
			    d->path);
		while (*s == ' ')
			s++;
		if (*s != '\0')
			return vdsk_error(EINVAL, "%s: trailing text on a VMDK "
			    "extent line", d->path);
		fd = open_extent(d, name, x->writable &&
		    !(d->flags & VDSK_RDONLY));
		if (fd < 0)
			return fd;
		x->fd = fd;
		x->offset = off * 512;
	}
	desc->n++;
	d->size += x->len;
	return 0;
}

int
vmdk_desc_parse(struct vdsk *d, struct vmdk_desc *desc, char *text,
    int embedded)
{
	char *line, *next, *eq;
	int r;

	for (line = text; line != NULL && *line != '\0'; line = next) {
		next = strchr(line, '\n');
		if (next != NULL)
			*next++ = '\0';
		line = trim(line);
		if (line[0] == '\0' || line[0] == '#')
			continue;
		if (strncmp(line, "RW ", 3) == 0 ||
		    strncmp(line, "RDONLY ", 7) == 0 ||
		    strncmp(line, "NOACCESS ", 9) == 0) {
			if (embedded)
				continue;
			if ((r = parse_extent(d, desc, line)) < 0)
				return r;
			continue;
		}
		if ((eq = strchr(line, '=')) == NULL)
			continue;
		*eq = '\0';
		line = trim(line);
		eq = unquote(trim(eq + 1));
		if (strcmp(line, "createType") == 0) {
			if (strlen(eq) >= sizeof(desc->create_type))
				return vdsk_error(EINVAL, "%s: VMDK createType "
				    "too long", d->path);
			strcpy(desc->create_type, eq);
		} else if (strcmp(line, "parentFileNameHint") == 0) {
			if (strlen(eq) >= sizeof(desc->parent))
				return vdsk_error(EINVAL, "%s: VMDK parent name "
				    "too long", d->path);
			strcpy(desc->parent, eq);
		}
	}
	return 0;
}

int
vmdk_desc_open(struct vdsk *d, struct vmdk_desc *desc, size_t max)
{
	char *text;
	unsigned i;
	int r;

	for (i = 0; i < VMDK_MAX_EXTENTS; i++)
		desc->ext[i].fd = -1;
	if (d->file_size > max)
		return vdsk_error(EINVAL, "%s: VMDK descriptor file too large",
		    d->path);
	if ((text = malloc(d->file_size + 1)) == NULL)
		return vdsk_error(ENOMEM, "out of memory");
	r = vdsk_pread(d, text, d->file_size, 0, "VMDK descriptor");
	if (r == 0) {
		text[d->file_size] = '\0';
		if (strncmp(text, "# Disk DescriptorFile", 21) != 0)
			r = vdsk_error(EINVAL, "%s: not a VMDK image", d->path);
	}
	d->size = 0;
	/* createType first: refuse unknown layouts before opening files */
	if (r == 0) {
		char *copy = strdup(text);

		if (copy == NULL)
			r = vdsk_error(ENOMEM, "out of memory");
		else
			r = vmdk_desc_parse(d, desc, copy, 1);
		free(copy);
	}
	if (r == 0 && strcmp(desc->create_type, "monolithicFlat") != 0)
		r = vdsk_error(ENOTSUP, "%s: VMDK createType '%s' is not "
		    "supported (monolithicSparse, monolithicFlat, "
		    "streamOptimized)", d->path, desc->create_type);
	if (r == 0 && desc->parent[0] != '\0')
		r = vdsk_error(ENOTSUP, "%s: VMDK flat images with a parent are "
		    "not supported", d->path);
	if (r == 0)
		r = vmdk_desc_parse(d, desc, text, 0);
	if (r == 0 && desc->n == 0)
		r = vdsk_error(EINVAL, "%s: VMDK descriptor has no extents",
		    d->path);
	free(text);
	return r;
}

static struct vmdk_extent *
find_extent(struct vmdk_desc *desc, uint64_t off)
{
	unsigned i;

	for (i = 0; i < desc->n; i++)
		if (off >= desc->ext[i].start &&
		    off - desc->ext[i].start < desc->ext[i].len)
			return &desc->ext[i];
	return NULL;
}

int
vmdk_desc_io(struct vdsk *d, struct vmdk_desc *desc, void *buf,
    uint64_t off, size_t len, int write)
{
	uint8_t *p = buf;

	while (len > 0) {
		struct vmdk_extent *x = find_extent(desc, off);
		uint64_t in, left;
		size_t n;
		ssize_t k;

		if (x == NULL)
			return vdsk_error(EIO, "%s: no VMDK extent at %#llx",
			    d->path, (unsigned long long)off);
		in = off - x->start;
		left = x->len - in;
		n = left < len ? (size_t)left : len;
		if (write && !x->writable)
			return vdsk_error(EROFS, "%s: VMDK extent at %#llx is "
			    "read-only", d->path, (unsigned long long)off);
		if (x->fd < 0) {
			memset(p, 0, n);
			k = (ssize_t)n;
		} else if (write) {
			k = pwrite(x->fd, p, n, (off_t)(x->offset + in));
		} else {
			k = pread(x->fd, p, n, (off_t)(x->offset + in));
			if (k == 0) {   /* past the end of the extent file */
				memset(p, 0, n);
				k = (ssize_t)n;
			}
		}
		if (k < 0) {
			if (errno == EINTR)
				continue;
			return vdsk_error(errno, "%s: VMDK extent I/O at %#llx: "
			    "%s", d->path, (unsigned long long)off,
			    strerror(errno));
		}
		p += k;
		off += (uint64_t)k;
		len -= (size_t)k;
	}
	return 0;
}

int
vmdk_desc_flush(struct vdsk *d, struct vmdk_desc *desc)
{
	unsigned i;

	for (i = 0; i < desc->n; i++)
		if (desc->ext[i].fd >= 0 && desc->ext[i].writable &&
		    fsync(desc->ext[i].fd) < 0)
			return vdsk_error(errno, "%s: fsync: %s", d->path,
			    strerror(errno));
	return 0;
}

void
vmdk_desc_free(struct vmdk_desc *desc)
{
	unsigned i;

	for (i = 0; i < desc->n; i++)
		if (desc->ext[i].fd >= 0)
			close(desc->ext[i].fd);
	desc->n = 0;
}
