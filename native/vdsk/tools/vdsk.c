/*
 * vdsk: a small command line front end to libvdsk, used by tests.
 *
 *   vdsk info [--json] [-f FMT] FILE
 *   vdsk create -f FMT [-o subformat=SUB] [-b BACKING [-F BFMT]]
 *               [-c CLUSTER] FILE [SIZE]
 *   vdsk read [-f FMT] FILE OFFSET LEN      > data
 *   vdsk write [-f FMT] FILE OFFSET         < data
 *
 * Sizes and offsets accept K, M, G, T suffixes (powers of 1024).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vdsk.h"

#define CHUNK (1u << 20)

static int
usage(void)
{
	fprintf(stderr,
	    "usage: vdsk info [--json] [-f FMT] FILE\n"
	    "       vdsk create -f FMT [-o subformat=SUB] [-b BACKING "
	    "[-F BFMT]] [-c CLUSTER] FILE [SIZE]\n"
	    "       vdsk read [-f FMT] FILE OFFSET LEN\n"
	    "       vdsk write [-f FMT] FILE OFFSET\n");
	return 2;
}

static int
fail(const char *what)
{
	fprintf(stderr, "vdsk: %s: %s (errno %d)\n", what, vdsk_errmsg(),
	    vdsk_errno());
	return 1;
}

static int
parse_size(const char *s, uint64_t *out)
{
	char *end;
	unsigned long long v;
	unsigned shift = 0;

	if (s[0] < '0' || s[0] > '9')
		return -1;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno != 0)
		return -1;
	switch (*end) {
	case 'k': case 'K': shift = 10; end++; break;
	case 'm': case 'M': shift = 20; end++; break;
	case 'g': case 'G': shift = 30; end++; break;
	case 't': case 'T': shift = 40; end++; break;
	case '\0': break;
	default: return -1;
	}
	if (*end == 'B' || *end == 'b')
		end++;
	if (*end != '\0' || (shift && v > (~0ULL >> shift)))
		return -1;
	*out = (uint64_t)v << shift;
	return 0;
}

static void
json_str(const char *key, const char *s, int last)
{
	printf("    \"%s\": ", key);
	if (s == NULL || s[0] == '\0') {
		printf("null");
	} else {
		putchar('"');
		for (; *s; s++) {
			unsigned char c = (unsigned char)*s;
			if (c == '"' || c == '\\')
				printf("\\%c", c);
			else if (c < 0x20)
				printf("\\u%04x", c);
			else
				putchar(c);
		}
		putchar('"');
	}
	printf("%s\n", last ? "" : ",");
}

struct args {
	const char *fmt, *backing, *bfmt, *subformat, *pos[4];
	int npos, json;
	uint64_t cluster;
};

static int
parse_args(int argc, char **argv, struct args *a)
{
	int i;

	memset(a, 0, sizeof(*a));
	for (i = 0; i < argc; i++) {
		const char *s = argv[i];
		const char **dst = NULL;

		if (strcmp(s, "--json") == 0) {
			a->json = 1;
			continue;
		}
		if (strcmp(s, "-f") == 0)
			dst = &a->fmt;
		else if (strcmp(s, "-b") == 0)
			dst = &a->backing;
		else if (strcmp(s, "-F") == 0)
			dst = &a->bfmt;
		else if (strcmp(s, "-o") == 0) {
			if (i + 1 >= argc || strncmp(argv[i + 1], "subformat=",
			    10) != 0)
				return -1;
			a->subformat = argv[++i] + 10;
			continue;
		}
		else if (strcmp(s, "-c") == 0) {
			if (i + 1 >= argc || parse_size(argv[++i],
			    &a->cluster) < 0 || a->cluster > UINT32_MAX)
				return -1;
			continue;
		}
		if (dst != NULL) {
			if (i + 1 >= argc)
				return -1;
			*dst = argv[++i];
			continue;
		}
		if (s[0] == '-' && s[1] != '\0')
			return -1;
		if (a->npos >= 4)
			return -1;
		a->pos[a->npos++] = s;
	}
	return 0;
}

static int
cmd_info(struct args *a)
{
	struct vdsk_info info;
	vdsk_t *d;

	if (a->npos != 1)
		return usage();
	d = vdsk_open(a->pos[0], a->fmt, VDSK_RDONLY | VDSK_NO_BACKING);
	if (d == NULL)
		return fail("open");
	if (vdsk_info(d, &info) < 0) {
		vdsk_close(d);
		return fail("info");
	}
	vdsk_close(d);
	if (a->json) {
		printf("{\n");
		json_str("filename", a->pos[0], 0);
		json_str("format", info.format, 0);
		printf("    \"virtual-size\": %llu,\n",
		    (unsigned long long)info.virtual_size);
		if (info.cluster_size)
			printf("    \"cluster-size\": %u,\n",
			    info.cluster_size);
		json_str("backing-filename", info.backing_file, 0);
		json_str("backing-filename-format", info.backing_format, 0);
		printf("    \"dirty-flag\": %s,\n",
		    info.dirty ? "true" : "false");
		printf("    \"actual-size\": %llu\n}\n",
		    (unsigned long long)info.actual_size);
	} else {
		printf("image: %s\nfile format: %s\nvirtual size: %llu\n",
		    a->pos[0], info.format,
		    (unsigned long long)info.virtual_size);
		printf("disk size: %llu\n",
		    (unsigned long long)info.actual_size);
		if (info.cluster_size)
			printf("cluster_size: %u\n", info.cluster_size);
		if (info.backing_file[0])
			printf("backing file: %s\n", info.backing_file);
		if (info.backing_format[0])
			printf("backing file format: %s\n",
			    info.backing_format);
	}
	return 0;
}

static int
cmd_create(struct args *a)
{
	uint64_t size = 0;

	if (a->fmt == NULL || a->npos < 1 || a->npos > 2 ||
	    (a->npos == 1 && a->backing == NULL) ||
	    (a->bfmt != NULL && a->backing == NULL))
		return usage();
	if (a->npos == 2 && parse_size(a->pos[1], &size) < 0) {
		fprintf(stderr, "vdsk: invalid size '%s'\n", a->pos[1]);
		return 2;
	}
	if (vdsk_create_subformat(a->pos[0], a->fmt, a->subformat, size,
	    a->backing, a->bfmt, (uint32_t)a->cluster) < 0)
		return fail("create");
	return 0;
}

static int
cmd_read(struct args *a)
{
	uint64_t off, len;
	vdsk_t *d;
	char *buf;
	int rc = 0;

	if (a->npos != 3 || parse_size(a->pos[1], &off) < 0 ||
	    parse_size(a->pos[2], &len) < 0)
		return usage();
	if ((d = vdsk_open(a->pos[0], a->fmt, VDSK_RDONLY)) == NULL)
		return fail("open");
	if ((buf = malloc(CHUNK)) == NULL) {
		vdsk_close(d);
		fprintf(stderr, "vdsk: out of memory\n");
		return 1;
	}
	while (len > 0) {
		size_t n = len < CHUNK ? (size_t)len : CHUNK;
		if (vdsk_read(d, buf, off, n) < 0) {
			rc = fail("read");
			break;
		}
		if (fwrite(buf, 1, n, stdout) != n) {
			perror("vdsk: stdout");
			rc = 1;
			break;
		}
		off += n;
		len -= n;
	}
	free(buf);
	vdsk_close(d);
	if (fflush(stdout) != 0)
		rc = 1;
	return rc;
}

static int
cmd_write(struct args *a)
{
	uint64_t off;
	vdsk_t *d;
	char *buf;
	size_t n;
	int rc = 0;

	if (a->npos != 2 || parse_size(a->pos[1], &off) < 0)
		return usage();
	if ((d = vdsk_open(a->pos[0], a->fmt, 0)) == NULL)
		return fail("open");
	if ((buf = malloc(CHUNK)) == NULL) {
		vdsk_close(d);
		fprintf(stderr, "vdsk: out of memory\n");
		return 1;
	}
	while ((n = fread(buf, 1, CHUNK, stdin)) > 0) {
		if (vdsk_write(d, buf, off, n) < 0) {
			rc = fail("write");
			break;
		}
		off += n;
	}
	if (rc == 0 && ferror(stdin)) {
		perror("vdsk: stdin");
		rc = 1;
	}
	if (rc == 0 && vdsk_flush(d) < 0)
		rc = fail("flush");
	free(buf);
	if (vdsk_close(d) < 0 && rc == 0)
		rc = fail("close");
	return rc;
}

int
main(int argc, char **argv)
{
	struct args a;

	if (argc < 2)
		return usage();
	if (parse_args(argc - 2, argv + 2, &a) < 0)
		return usage();
	if (strcmp(argv[1], "info") == 0)
		return cmd_info(&a);
	if (strcmp(argv[1], "create") == 0)
		return cmd_create(&a);
	if (strcmp(argv[1], "read") == 0)
		return cmd_read(&a);
	if (strcmp(argv[1], "write") == 0)
		return cmd_write(&a);
	return usage();
}
