/*
 * vdsktool: a small command line front end to libvdsk, for tests and
 * development (users have the Python `vdsk` command, nova_bhyve/vdsk_cli.py;
 * where the two share a flag it means the same thing).
 *
 *   vdsktool info [--json] [-f FMT] FILE
 *   vdsktool create -f FMT [-o subformat=SUB,cluster_size=N]
 *                   [-b BACKING [-F BFMT]] FILE [SIZE]
 *   vdsktool read [-f FMT] FILE OFFSET LEN       > data
 *   vdsktool write [-f FMT] [-c] FILE OFFSET     < data   (-c: compressed)
 *   vdsktool check [-r leaks|all] [--json] [-f FMT] FILE
 *       exit 0 clean, 2 corrupt, 3 leaks (qemu-img's codes); -r all
 *       repairs leaks only, as in vdsk
 *   vdsktool snapshot -c NAME | -l | -a NAME | -d NAME FILE
 *   vdsktool resize [-f FMT] FILE SIZE
 *   vdsktool discard [-f FMT] FILE OFFSET LEN
 *   vdsktool convert [-f FMT] -O FMT [-c] [-o cluster_size=N] [-m WORKERS]
 *                    [-B BUFSIZE] [-t writeback|unsafe] [-R] SRC DST
 *
 * -c is --compress (write, convert) or create (snapshot), as in vdsk.
 * Sizes and offsets accept K, M, G, T suffixes (powers of 1024).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
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
	    "usage: vdsktool info [--json] [-f FMT] FILE\n"
	    "       vdsktool create -f FMT [-o subformat=SUB,cluster_size=N]\n"
	    "                       [-b BACKING [-F BFMT]] FILE [SIZE]\n"
	    "       vdsktool read [-f FMT] FILE OFFSET LEN\n"
	    "       vdsktool write [-f FMT] [-c] FILE OFFSET\n"
	    "       vdsktool check [-r leaks|all] [--json] [-f FMT] FILE\n"
	    "       vdsktool snapshot -c NAME | -l | -a NAME | -d NAME FILE\n"
	    "       vdsktool resize [-f FMT] FILE SIZE\n"
	    "       vdsktool discard [-f FMT] FILE OFFSET LEN\n"
	    "       vdsktool convert [-f FMT] -O FMT [-c] "
	    "[-o cluster_size=N] [-m WORKERS] [-B BUFSIZE]\n"
	    "                        [-t writeback|unsafe] [-R] SRC DST\n");
	return 2;
}

static int
fail(const char *what)
{
	fprintf(stderr, "vdsktool: %s: %s (errno %d)\n", what, vdsk_errmsg(),
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
	int npos, json, repair, no_flush;
	uint64_t cluster, workers, buf;
	int seen[128];              /* count of each argument-less flag */
};

/* long-only options */
enum { OPT_JSON = 256 };

static const struct option json_longopts[] = {
	{ "json", no_argument, NULL, OPT_JSON },
	{ NULL, 0, NULL, 0 },
};

static const struct option compress_longopts[] = {
	{ "compress", no_argument, NULL, 'c' },
	{ NULL, 0, NULL, 0 },
};

static const struct option no_longopts[] = {
	{ NULL, 0, NULL, 0 },
};

/* -o: comma-separated key=value pairs, as in qemu-img and vdsk */
static int
parse_o(char *list, struct args *a)
{
	char *kv, *save = NULL;

	for (kv = strtok_r(list, ",", &save); kv != NULL;
	    kv = strtok_r(NULL, ",", &save)) {
		char *v = strchr(kv, '=');

		if (v == NULL)
			return -1;
		*v++ = '\0';
		if (strcmp(kv, "subformat") == 0)
			a->subformat = v;
		else if (strcmp(kv, "cluster_size") == 0 ||
		    strcmp(kv, "cluster-size") == 0) {
			if (parse_size(v, &a->cluster) < 0 ||
			    a->cluster > UINT32_MAX)
				return -1;
		} else
			return -1;
	}
	return 0;
}

static int
parse_count(const char *s, uint64_t *out)
{
	return parse_size(s, out) < 0 || *out > INT32_MAX ? -1 : 0;
}

/*
 * Options of one command (getopt_long, GNU argument permutation: options
 * may follow the operands), then its operands into a->pos.
 */
static int
parse_args(int argc, char **argv, const char *shortopts,
    const struct option *longopts, struct args *a)
{
	int c;

	memset(a, 0, sizeof(*a));
	while ((c = getopt_long(argc, argv, shortopts, longopts, NULL)) != -1) {
		switch (c) {
		case 'f': a->fmt = optarg; break;
		case 'b': a->backing = optarg; break;
		case 'F': a->bfmt = optarg; break;
		case 'O': a->ofmt = optarg; break;
		case OPT_JSON: a->json = 1; break;
		case 'o':
			if (parse_o(optarg, a) < 0)
				return -1;
			break;
		case 'm':
			if (parse_count(optarg, &a->workers) < 0)
				return -1;
			break;
		case 'B':
			if (parse_count(optarg, &a->buf) < 0)
				return -1;
			break;
		case 'r':
			if (strcmp(optarg, "leaks") != 0 &&
			    strcmp(optarg, "all") != 0)
				return -1;
			a->repair = 1;
			break;
		case 't':
			if (strcmp(optarg, "unsafe") == 0)
				a->no_flush = 1;
			else if (strcmp(optarg, "writeback") != 0)
				return -1;
			break;
		case 'c': case 'l': case 'a': case 'd': case 'R':
			a->seen[c]++;
			break;
		default:        /* '?': getopt has said what is wrong */
			return -1;
		}
	}
	if (argc - optind > 4)
		return -1;
	for (c = optind; c < argc; c++)
		a->pos[a->npos++] = argv[c];
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
		fprintf(stderr, "vdsktool: invalid size '%s'\n", a->pos[1]);
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
		fprintf(stderr, "vdsktool: out of memory\n");
		return 1;
	}
	while (len > 0) {
		size_t n = len < CHUNK ? (size_t)len : CHUNK;
		if (vdsk_read(d, buf, off, n) < 0) {
			rc = fail("read");
			break;
		}
		if (fwrite(buf, 1, n, stdout) != n) {
			perror("vdsktool: stdout");
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
		fprintf(stderr, "vdsktool: out of memory\n");
		return 1;
	}
	if (a->seen['c']) {
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
	while (rc == 0 && !a->seen['c'] &&
	    (n = fread(buf, 1, CHUNK, stdin)) > 0) {
		if (vdsk_write(d, buf, off, n) < 0) {
			rc = fail("write");
			break;
		}
		off += n;
	}
	if (rc == 0 && ferror(stdin)) {
		perror("vdsktool: stdin");
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
cmd_snapshot(struct args *a)
{
	const char *name = NULL, *path;
	struct vdsk_snapshot *sn = NULL;
	char op;
	vdsk_t *d;
	int n, i, r = 0;

	/* exactly one of -c, -l, -a, -d; all but -l name a snapshot */
	if (a->seen['c'] + a->seen['l'] + a->seen['a'] + a->seen['d'] != 1)
		return usage();
	op = a->seen['c'] ? 'c' : a->seen['l'] ? 'l' : a->seen['a'] ? 'a' :
	    'd';
	if (a->npos != (op == 'l' ? 1 : 2))
		return usage();
	if (op != 'l')
		name = a->pos[0];
	path = a->pos[a->npos - 1];
	d = vdsk_open(path, NULL, (op == 'l' ? VDSK_RDONLY : 0) |
	    VDSK_NO_BACKING);
	if (d == NULL)
		return fail("open");
	switch (op) {
	case 'l':
		n = vdsk_snapshot_list(d, NULL, 0);
		if (n > 0 && (sn = calloc((size_t)n, sizeof(*sn))) == NULL) {
			vdsk_close(d);
			fprintf(stderr, "vdsktool: out of memory\n");
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
cmd_resize(struct args *a)
{
	return cmd_resize_discard(a, 0);
}

static int
cmd_discard(struct args *a)
{
	return cmd_resize_discard(a, 1);
}

static int
cmd_convert(struct args *a)
{
	struct vdsk_convert_opts o;

	if (a->npos != 2 || a->ofmt == NULL || a->subformat != NULL)
		return usage();
	memset(&o, 0, sizeof(o));
	o.workers = (int)a->workers;
	o.buf_size = (uint32_t)a->buf;
	o.cluster_size = (uint32_t)a->cluster;
	o.flags = (a->seen['c'] ? VDSK_CONVERT_COMPRESS : 0) |
	    (a->no_flush ? VDSK_CONVERT_NO_FLUSH : 0) |
	    (a->seen['R'] ? VDSK_CONVERT_COPY_RANGE : 0);
	if (vdsk_convert(a->pos[0], a->fmt, a->pos[1], a->ofmt, &o) < 0)
		return fail("convert");
	return 0;
}

/* each command's options: a getopt optstring and its long options */
static const struct command {
	const char *name;
	const char *shortopts;
	const struct option *longopts;
	int (*run)(struct args *);
} commands[] = {
	{ "info", "f:", json_longopts, cmd_info },
	{ "create", "f:o:b:F:", no_longopts, cmd_create },
	{ "read", "f:", no_longopts, cmd_read },
	{ "write", "f:c", compress_longopts, cmd_write },
	{ "check", "f:r:", json_longopts, cmd_check },
	{ "snapshot", "clad", no_longopts, cmd_snapshot },
	{ "resize", "f:", no_longopts, cmd_resize },
	{ "discard", "f:", no_longopts, cmd_discard },
	{ "convert", "f:O:co:m:B:t:R", compress_longopts, cmd_convert },
};

int
main(int argc, char **argv)
{
	struct args a;
	size_t i;

	if (argc < 2)
		return usage();
	for (i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
		const struct command *c = &commands[i];

		if (strcmp(argv[1], c->name) != 0)
			continue;
		/* getopt sees the command name as argv[0] (its messages'
		 * prefix) and starts at the word after it */
		if (parse_args(argc - 1, argv + 1, c->shortopts, c->longopts,
		    &a) < 0)
			return usage();
		return c->run(&a);
	}
	return usage();
}
