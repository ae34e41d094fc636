/*
 * nova-bhyve-conlog: one VM's serial console log, kept bounded while the
 * VM runs.
 *
 *   nova-bhyve-conlog [-f] KEEP_BYTES
 *
 * stdin:  the read end of the pipe the VM process (QEMU's chardev
 *         logfile=/dev/fdset/N) writes the console to;
 * stdout: the console log, opened by the caller read-write and O_APPEND.
 *
 * Everything read is appended to the log. When the log grows past
 * KEEP_BYTES, its last KEEP_BYTES / 2 bytes (from the first line start in
 * them) are moved to its beginning and the file is cut there: in place,
 * through the descriptor, so the log may be renamed or moved meanwhile and
 * no path is ever opened (but /dev/null when detaching). The program exits
 * at end of file: every writer closed the pipe (the VM process is gone).
 *
 * Without -f it detaches (fork, setsid) once its arguments are checked, so
 * that it outlives the process that started it, like the VM does; the
 * parent exits 0, or 2 with a message on a usage error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define CHUNK 65536
#define MIN_KEEP 4096

static char buf[CHUNK];

static int write_all(int fd, const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = write(fd, p, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

static int pwrite_all(int fd, const char *p, size_t n, off_t off)
{
	while (n > 0) {
		ssize_t w = pwrite(fd, p, n, off);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += w;
		n -= (size_t)w;
		off += w;
	}
	return 0;
}

/* Keep the tail of the log: the last keep/2 bytes, from a line start when
 * one is in them. Copies forward in CHUNK pieces (the source is always
 * ahead of the destination). O_APPEND is lifted meanwhile: with it Linux
 * pwrite() ignores the offset. */
static int rotate(int fd, off_t keep)
{
	struct stat st;
	off_t from, to = 0, size;
	int flags, rc = -1;

	if (fstat(fd, &st) < 0)
		return -1;
	size = st.st_size;
	if (size <= keep)
		return 0;
	from = size - keep / 2;
	/* start at the first line start in the kept part, if any */
	{
		ssize_t r = pread(fd, buf, CHUNK, from);
		if (r > 0) {
			char *nl = memchr(buf, '\n', (size_t)r);
			if (nl && nl + 1 < buf + r)
				from += (nl - buf) + 1;
		}
	}
	flags = fcntl(fd, F_GETFL);
	if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_APPEND) < 0)
		return -1;
	while (from < size) {
		ssize_t r = pread(fd, buf, CHUNK, from);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			goto out;
		}
		if (r == 0)
			break;
		if (pwrite_all(fd, buf, (size_t)r, to) < 0)
			goto out;
		from += r;
		to += r;
	}
	if (ftruncate(fd, to) < 0)
		goto out;
	rc = 0;
out:
	if (fcntl(fd, F_SETFL, flags) < 0)
		rc = -1;
	return rc;
}

static void usage(void)
{
	fprintf(stderr, "usage: nova-bhyve-conlog [-f] KEEP_BYTES "
		"<PIPE >>LOG\n");
	exit(2);
}

int main(int argc, char **argv)
{
	int foreground = 0, argi = 1;
	long long keep;
	char *end;
	struct stat st;

	if (argi < argc && strcmp(argv[argi], "-f") == 0) {
		foreground = 1;
		argi++;
	}
	if (argi + 1 != argc)
		usage();
	errno = 0;
	keep = strtoll(argv[argi], &end, 10);
	if (errno || *end || end == argv[argi] || keep < MIN_KEEP) {
		fprintf(stderr, "nova-bhyve-conlog: KEEP_BYTES must be an "
			"integer >= %d\n", MIN_KEEP);
		return 2;
	}
	if (fstat(0, &st) < 0 || !S_ISFIFO(st.st_mode)) {
		fprintf(stderr, "nova-bhyve-conlog: stdin is not a pipe\n");
		return 2;
	}
	if (fstat(1, &st) < 0 || !S_ISREG(st.st_mode) ||
	    (fcntl(1, F_GETFL) & O_ACCMODE) != O_RDWR) {
		fprintf(stderr, "nova-bhyve-conlog: stdout is not a regular "
			"file open for reading and writing\n");
		return 2;
	}
	signal(SIGHUP, SIG_IGN);
	signal(SIGPIPE, SIG_IGN);
	if (!foreground) {
		pid_t pid = fork();
		int nul;

		if (pid < 0) {
			perror("nova-bhyve-conlog: fork");
			return 1;
		}
		if (pid > 0)
			_exit(0);
		setsid();
		if (chdir("/") < 0)
			_exit(1);
		nul = open("/dev/null", O_RDWR | O_CLOEXEC);
		if (nul >= 0) {
			dup2(nul, 2);
			close(nul);
		}
	}
	for (;;) {
		ssize_t n = read(0, buf, CHUNK);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (n == 0)
			break;
		/* a full disk loses console output, never blocks the VM: keep
		 * draining the pipe */
		if (write_all(1, buf, (size_t)n) < 0)
			continue;
		if (fstat(1, &st) == 0 && st.st_size > keep)
			rotate(1, (off_t)keep);
	}
	return 0;
}
