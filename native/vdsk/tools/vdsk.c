/*
 * vdsk: a small command line front end to libvdsk, used by tests.
 *
 *   vdsk info [--json] [-f FMT] FILE
 *   vdsk create -f FMT [-o subformat=SUB] [-b BACKING [-F BFMT]]
 *               [-c CLUSTER] FILE [SIZE]
 *   vdsk read [-f FMT] FILE OFFSET LEN      > data
 *   vdsk write [-f FMT] [--compressed] FILE OFFSET   < data
 *   vdsk check [-r leaks] [--json] [-f FMT] FILE   exit 0 clean, 2 corrupt,
 *                                                  3 leaks (qemu-img's codes)
 *   vdsk snapshot -c NAME | -l | -a NAME | -d NAME FILE
 *   vdsk resize [-f FMT] FILE SIZE
 *   vdsk discard [-f FMT] FILE OFFSET LEN
 *   vdsk convert [-f FMT] -O FMT [-c CLUSTER] [--compressed] [-m WORKERS]
 *                [-B BUFSIZE] SRC DST
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
	    "       vdsk write [-f FMT] [--compressed] FILE OFFSET\n"
	    "       vdsk check [-r leaks] [--json] [-f FMT] FILE\n"
	    "       vdsk snapshot -c NAME | -l | -a NAME | -d NAME FILE\n"
	    "       vdsk resize [-f FMT] FILE SIZE\n"
	    "       vdsk discard [-f FMT] FILE OFFSET LEN\n"
	    "       vdsk convert [-f FMT] -O FMT [-c CLUSTER] [--compressed] "
	    "[-m WORKERS] [-B BUFSIZE] SRC DST\n");
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
	const char *fmt, *backing, *bfmt, *ofmt, *subformat, *pos[4];
	int npos, json, compressed, repair;
	uint64_t cluster, workers, buf;
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
		if (strcmp(s, "--compressed") == 0) {
			a->compressed = 1;
			continue;
		}
		if (strcmp(s, "-r") == 0) {
			if (i + 1 >= argc || strcmp(argv[++i], "leaks") != 0)
				return -1;
			a->repair = 1;
			continue;
		}
		if (strcmp(s, "-f") == 0)
			dst = &a->fmt;
		else if (strcmp(s, "-b") == 0)
			dst = &a->backing;
		else if (strcmp(s, "-F") == 0)
			dst = &a->bfmt;
		else if (strcmp(s, "-O") == 0)
			dst = &a->ofmt;
		else if (strcmp(s, "-m") == 0 || strcmp(s, "-B") == 0) {
			if (i + 1 >= argc || parse_size(argv[i + 1],
			    s[1] == 'm' ? &a->workers : &a->buf) < 0 ||
			    (s[1] == 'm' ? a->workers : a->buf) > INT32_MAX)
				return -1;
			i++;
			continue;
		}
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
		printf("    \"snapshots\": %u,\n", info.nb_snapshots);
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
		if (info.nb_snapshots)
			printf("snapshots: %u\n", info.nb_snapshots);
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
	if (a->compressed) {
		struct vdsk_info info;

		if (vdsk_info(d, &info) < 0 || info.cluster_size == 0)
			rc = fail("write");
		while (rc == 0 && (n = fread(buf, 1, info.cluster_size,
		    stdin)) > 0) {
			if (vdsk_write_compressed(d, buf, off, n) < 0) {
				rc = fail("write");
				break;
			}
			off += n;
		}
	}
	while (rc == 0 && !a->compressed &&
	    (n = fread(buf, 1, CHUNK, stdin)) > 0) {
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

static int
cmd_check(struct args *a)
{
	struct vdsk_check res;

	if (a->npos != 1)
		return usage();
	if (vdsk_check(a->pos[0], a->fmt, a->repair ?
	    VDSK_CHECK_REPAIR_LEAKS : 0, &res) < 0) {
		fail("check");
		return 1;
	}
	if (a->json) {
		printf("{\n    \"filename\": \"%s\",\n", a->pos[0]);
		printf("    \"corruptions\": %llu,\n    \"leaks\": %llu,\n"
		    "    \"corruptions-fixed\": %llu,\n"
		    "    \"leaks-fixed\": %llu,\n"
		    "    \"allocated-clusters\": %llu,\n"
		    "    \"total-clusters\": %llu\n}\n",
		    (unsigned long long)res.corruptions,
		    (unsigned long long)res.leaks,
		    (unsigned long long)res.corruptions_fixed,
		    (unsigned long long)res.leaks_fixed,
		    (unsigned long long)res.allocated_clusters,
		    (unsigned long long)res.total_clusters);
	} else {
		if (res.leaks_fixed)
			printf("The following inconsistencies were found and "
			    "repaired:\n\n    %llu leaked clusters\n\n",
			    (unsigned long long)res.leaks_fixed);
		if (res.corruptions)
			printf("%llu errors were found on the image.\n",
			    (unsigned long long)res.corruptions);
		if (res.leaks)
			printf("%llu leaked clusters were found on the "
			    "image.\n", (unsigned long long)res.leaks);
		if (!res.corruptions && !res.leaks)
			printf("No errors were found on the image.\n");
		printf("%llu/%llu = allocated clusters\n",
		    (unsigned long long)res.allocated_clusters,
		    (unsigned long long)res.total_clusters);
	}
	return res.corruptions ? 2 : res.leaks ? 3 : 0;
}

static int
cmd_snapshot(int argc, char **argv)
{
	const char *name = NULL, *path;
	struct vdsk_snapshot *sn = NULL;
	char op = 0;
	vdsk_t *d;
	int n, i, r = 0;

	if (argc == 2 && strcmp(argv[0], "-l") == 0) {
		op = 'l';
	} else if (argc == 3 && argv[0][0] == '-' && argv[0][2] == '\0' &&
	    strchr("cad", argv[0][1]) != NULL) {
		op = argv[0][1];
		name = argv[1];
	} else {
		return usage();
	}
	path = argv[argc - 1];
	d = vdsk_open(path, NULL, (op == 'l' ? VDSK_RDONLY : 0) |
	    VDSK_NO_BACKING);
	if (d == NULL)
		return fail("open");
	switch (op) {
	case 'l':
		n = vdsk_snapshot_list(d, NULL, 0);
		if (n > 0 && (sn = calloc((size_t)n, sizeof(*sn))) == NULL) {
			vdsk_close(d);
			fprintf(stderr, "vdsk: out of memory\n");
			return 1;
		}
		if (n > 0)
			n = vdsk_snapshot_list(d, sn, n);
		if (n < 0) {
			r = fail("snapshot");
			break;
		}
		if (n > 0)
			printf("Snapshot list:\nID\tTAG\tVM SIZE\tDATE\t"
			    "VM CLOCK\tDISK SIZE\n");
		for (i = 0; i < n; i++)
			printf("%s\t%s\t%llu\t%lld\t%llu\t%llu\n", sn[i].id,
			    sn[i].name,
			    (unsigned long long)sn[i].vm_state_size,
			    (long long)sn[i].date_sec,
			    (unsigned long long)sn[i].vm_clock_nsec,
			    (unsigned long long)sn[i].disk_size);
		free(sn);
		break;
	case 'c':
		if (vdsk_snapshot_create(d, name) < 0)
			r = fail("snapshot");
		break;
	case 'a':
		if (vdsk_snapshot_apply(d, name) < 0)
			r = fail("snapshot");
		break;
	default:
		if (vdsk_snapshot_delete(d, name) < 0)
			r = fail("snapshot");
		break;
	}
	if (vdsk_close(d) < 0 && r == 0)
		r = fail("close");
	return r;
}

static int
cmd_resize_discard(struct args *a, int discard)
{
	uint64_t x, len = 0;
	vdsk_t *d;
	int r = 0;

	if (a->npos != 2 + discard || parse_size(a->pos[1], &x) < 0 ||
	    (discard && parse_size(a->pos[2], &len) < 0))
		return usage();
	if ((d = vdsk_open(a->pos[0], a->fmt, 0)) == NULL)
		return fail("open");
	if (discard ? vdsk_discard(d, x, len) < 0 : vdsk_resize(d, x) < 0)
		r = fail(discard ? "discard" : "resize");
	if (vdsk_close(d) < 0 && r == 0)
		r = fail("close");
	return r;
}

static int
cmd_convert(struct args *a)
{
	struct vdsk_convert_opts o;

	if (a->npos != 2 || a->ofmt == NULL)
		return usage();
	memset(&o, 0, sizeof(o));
	o.workers = (int)a->workers;
	o.buf_size = (uint32_t)a->buf;
	o.cluster_size = (uint32_t)a->cluster;
	o.flags = a->compressed ? VDSK_CONVERT_COMPRESS : 0;
	if (vdsk_convert(a->pos[0], a->fmt, a->pos[1], a->ofmt, &o) < 0)
		return fail("convert");
	return 0;
}

int
main(int argc, char **argv)
{
	struct args a;

	if (argc < 2)
		return usage();
	if (strcmp(argv[1], "snapshot") == 0)
		return cmd_snapshot(argc - 2, argv + 2);
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
	if (strcmp(argv[1], "check") == 0)
		return cmd_check(&a);
	if (strcmp(argv[1], "resize") == 0)
		return cmd_resize_discard(&a, 0);
	if (strcmp(argv[1], "discard") == 0)
		return cmd_resize_discard(&a, 1);
	if (strcmp(argv[1], "convert") == 0)
		return cmd_convert(&a);
	return usage();
}
