/*
 * Shared libFuzzer harness for libvdsk (see fuzz_common.h).
 *
 * libvdsk opens images by path, so every input is written to a file in a
 * private directory (VDSK_FUZZ_TMPDIR, else /dev/shm, else /tmp).  The
 * directory also holds "base.raw", a small raw image: an input whose
 * backing file name has no '/' resolves into this directory, so backing
 * chains are exercised without ever following a name the fuzzer made up
 * to some other file on the machine.
 *
 * VHD footers and dynamic headers carry checksums that random mutation
 * almost never gets right, so for half of the inputs (by a bit of the
 * size) the harness recomputes them first and the mutations reach the
 * fields behind them; the other half keeps testing the checksum checks.
 *
 * Work per input is bounded whatever the virtual size claims: reads
 * cover at most READ_BUDGET bytes per open (spread over the disk when it
 * is larger), block status walks at most BS_STEPS runs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vdsk.h"
#include "vdsk_endian.h"
#include "fuzz_common.h"

#define READ_BUDGET     (1u << 20)
/* not a power of two: requests straddle cluster and block boundaries */
#define CHUNK           (60u * 1024 + 512)
#define BS_STEPS        64
#define MAX_SNAPS       8
#define BASE_SIZE       (192u * 1024)

static char dir[512], img[600], base[600];
static uint8_t buf[CHUNK];

static void
die(const char *what)
{
	fprintf(stderr, "vdsk-fuzz: contract violated: %s (errno %d: %s)\n",
	    what, vdsk_errno(), vdsk_errmsg());
	abort();
}

/* A failed call must leave a matching error code and a message. */
static void
failed(int r, const char *what)
{
	if (r >= 0)
		return;
	if (vdsk_errno() <= 0 || r != -vdsk_errno())
		die(what);
	if (strcmp(vdsk_errmsg(), "no error") == 0)
		die(what);
}

static void
cleanup(void)
{
	if (img[0])
		unlink(img);
	if (base[0])
		unlink(base);
	if (dir[0])
		rmdir(dir);
}

static void
write_file(const char *path, const uint8_t *data, size_t size)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);

	if (fd < 0) {
		perror(path);
		abort();
	}
	while (size > 0) {
		ssize_t n = write(fd, data, size);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			perror(path);
			abort();
		}
		data += n;
		size -= (size_t)n;
	}
	close(fd);
}

static void
setup(void)
{
	const char *t = getenv("VDSK_FUZZ_TMPDIR");
	static uint8_t pattern[BASE_SIZE];
	size_t i;

	if (t == NULL || t[0] == '\0')
		t = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
	snprintf(dir, sizeof(dir), "%s/vdsk-fuzz.XXXXXX", t);
	if (mkdtemp(dir) == NULL) {
		perror(dir);
		abort();
	}
	snprintf(img, sizeof(img), "%s/img", dir);
	snprintf(base, sizeof(base), "%s/base.raw", dir);
	for (i = 0; i < sizeof(pattern); i++)
		pattern[i] = (uint8_t)(i * 7 + (i >> 9));
	write_file(base, pattern, sizeof(pattern));
	atexit(cleanup);
}

/* Store the VHD checksum of b[0..len) (field at ck) if b has the magic. */
static void
vhd_fix(uint8_t *b, size_t len, size_t ck, const char *magic)
{
	uint32_t sum = 0;
	size_t i;

	if (memcmp(b, magic, 8) != 0)
		return;
	for (i = 0; i < len; i++)
		if (i < ck || i >= ck + 4)
			sum += b[i];
	be32_put(b + ck, ~sum);
}

/* Footer copy at 0, footer at the end, the dynamic header it points to. */
static void
vhd_fix_checksums(uint8_t *b, size_t n)
{
	uint64_t dh;

	if (n < 512)
		return;
	vhd_fix(b, 512, 64, "conectix");
	vhd_fix(b + n - 512, 512, 64, "conectix");
	dh = be64_get(memcmp(b, "conectix", 8) == 0 ? b + 16 :
	    b + n - 512 + 16);
	if (dh <= n && n - dh >= 1024)
		vhd_fix(b + dh, 1024, 36, "cxsparse");
	/* a dynamic header overlapping a footer changed it: redo them */
	vhd_fix(b, 512, 64, "conectix");
	vhd_fix(b + n - 512, 512, 64, "conectix");
}

static int
all_zero(const uint8_t *p, size_t n)
{
	while (n > 0 && *p == 0) {
		p++;
		n--;
	}
	return n == 0;
}

/* Read [off, off+len) in CHUNK pieces (len <= what the budget allows). */
static int
read_range(vdsk_t *d, uint64_t off, uint64_t len)
{
	while (len > 0) {
		size_t n = len < CHUNK ? (size_t)len : CHUNK;
		int r = vdsk_read(d, buf, off, n);

		if (r < 0) {
			failed(r, "vdsk_read");
			return r;
		}
		off += n;
		len -= n;
	}
	return 0;
}

static void
read_disk(vdsk_t *d, uint64_t size)
{
	uint64_t pieces, stride, i;

	if (size <= READ_BUDGET) {
		read_range(d, 0, size);
	} else {
		/* spread the budget: the start, evenly spaced chunks, the end */
		pieces = READ_BUDGET / CHUNK;
		stride = size / pieces;
		for (i = 0; i < pieces; i++)
			if (read_range(d, i * stride, CHUNK) < 0)
				break;
		read_range(d, size - CHUNK, CHUNK);
	}
	/* one past the end must be refused, not read */
	if (vdsk_read(d, buf, size, 1) == 0)
		die("read beyond the virtual size succeeded");
}

/*
 * Walk the allocation status from off.  Without a backing file open,
 * zero and unallocated runs must read as zeroes.
 */
static void
walk_status(vdsk_t *d, uint64_t off, uint64_t size, int have_backing)
{
	uint64_t pnum, len;
	int i, r;

	for (i = 0; i < BS_STEPS && off < size; i++) {
		len = size - off;
		pnum = 0;
		r = vdsk_block_status(d, off, len, &pnum);
		if (r < 0) {
			failed(r, "vdsk_block_status");
			return;
		}
		if (r != VDSK_BS_DATA && r != VDSK_BS_ZERO &&
		    r != VDSK_BS_UNALLOCATED)
			die("block status: unknown kind");
		if (pnum == 0 || pnum > len)
			die("block status: run length out of range");
		if (r == VDSK_BS_ZERO ||
		    (r == VDSK_BS_UNALLOCATED && !have_backing)) {
			size_t n = pnum < CHUNK ? (size_t)pnum : CHUNK;

			r = vdsk_read(d, buf, off, n);
			failed(r, "vdsk_read");
			if (r == 0 && !all_zero(buf, n))
				die("a zero/unallocated run reads non-zero");
		}
		off += pnum;
	}
}

static void
list_snapshots(vdsk_t *d, const struct vdsk_info *info)
{
	struct vdsk_snapshot s[MAX_SNAPS];
	int n, i;

	memset(s, 0xa5, sizeof(s));
	n = vdsk_snapshot_list(d, s, MAX_SNAPS);
	if (n < 0) {
		failed(n, "vdsk_snapshot_list");
		return;
	}
	if ((uint32_t)n != info->nb_snapshots)
		die("snapshot list and info disagree on the count");
	for (i = 0; i < n && i < MAX_SNAPS; i++)
		if (strnlen(s[i].id, sizeof(s[i].id)) == sizeof(s[i].id) ||
		    strnlen(s[i].name, sizeof(s[i].name)) ==
		    sizeof(s[i].name))
			die("snapshot id or name not terminated");
}

/* Everything a reader does with an open image. */
static void
exercise(vdsk_t *d, int have_backing, struct vdsk_info *info)
{
	uint64_t size = vdsk_size(d);
	int r;

	r = vdsk_info(d, info);
	if (r < 0) {
		failed(r, "vdsk_info");
		memset(info, 0, sizeof(*info));
		return;
	}
	if (info->virtual_size != size)
		die("info and vdsk_size disagree");
	if (strnlen(info->backing_file, sizeof(info->backing_file)) ==
	    sizeof(info->backing_file) ||
	    strnlen(info->format, sizeof(info->format)) ==
	    sizeof(info->format))
		die("info strings not terminated");
	read_disk(d, size);
	walk_status(d, 0, size, have_backing);
	if (size > READ_BUDGET)
		walk_status(d, size / 2, size, have_backing);
	list_snapshots(d, info);
}

/*
 * Open, exercise, close; returns 1 if it opened.  small_cache: the
 * smallest L2 table cache, so reads evict tables all the time.
 */
static int
open_and_exercise(const char *fmt, int flags, int small_cache,
    struct vdsk_info *info)
{
	struct vdsk_open_opts opts = { .l2_cache_size = small_cache ? 1 : 0 };
	vdsk_t *d = vdsk_open2(img, fmt, flags, &opts);
	int r;

	memset(info, 0, sizeof(*info));
	if (d == NULL) {
		if (vdsk_errno() <= 0)
			die("vdsk_open failed without an error");
		return 0;
	}
	exercise(d, !(flags & VDSK_NO_BACKING), info);
	r = vdsk_close(d);
	failed(r, "vdsk_close");
	return 1;
}

/* A backing name that stays inside the harness's directory. */
static int
local_backing(const struct vdsk_info *info)
{
	return info->backing_file[0] != '\0' &&
	    strchr(info->backing_file, '/') == NULL;
}

static void
check(const char *fmt)
{
	struct vdsk_check res;
	int r;

	r = vdsk_check(img, fmt, 0, &res);
	failed(r, "vdsk_check");
	if (r < 0)
		return;
	/* repair only if there is something to repair: it rewrites the
	 * private copy, so it comes last */
	if (res.leaks == 0 && res.corruptions == 0)
		return;
	r = vdsk_check(img, fmt, VDSK_CHECK_REPAIR_LEAKS, &res);
	failed(r, "vdsk_check (repair)");
}

void
fuzz_image(const uint8_t *data, size_t size, const char *fmt)
{
	struct vdsk_info info;
	int opened;

	if (dir[0] == '\0')
		setup();
	if ((fmt == NULL || strcmp(fmt, "vpc") == 0) && (size & 2) &&
	    size >= 512) {
		uint8_t *copy = malloc(size);

		if (copy == NULL)
			abort();
		memcpy(copy, data, size);
		vhd_fix_checksums(copy, size);
		write_file(img, copy, size);
		free(copy);
	} else {
		write_file(img, data, size);
	}
	opened = open_and_exercise(fmt, VDSK_RDONLY | VDSK_NO_BACKING,
	    (int)(size & 1), &info);
	if (fmt != NULL) {
		/* the probed open: only opening matters when it is the same */
		vdsk_t *d = vdsk_open(img, NULL, VDSK_RDONLY | VDSK_NO_BACKING);

		if (d == NULL && vdsk_errno() <= 0)
			die("vdsk_open (probed) failed without an error");
		if (d != NULL)
			failed(vdsk_close(d), "vdsk_close");
	}
	if (opened && local_backing(&info))
		open_and_exercise(fmt, VDSK_RDONLY, 1, &info);
	check(fmt);
}
