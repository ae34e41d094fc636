/*
 * nova-bhyve-launcher - start one program (a VM's device model) with no
 * ambient authority left.
 *
 *   nova-bhyve-launcher --uid U --gid G [--cgroup DIR]... [--keep-fd N]...
 *       [--ro PATH]... [--ro-fd N]... [--rx PATH]... [--rw PATH]...
 *       [--bind-port P]... [--connect-port P]...
 *       [--unshare ipc,uts,mount] [--status-fd N]
 *       [--daemonize --pid-fd N] -- /ABSOLUTE/PROGRAM [ARGS...]
 *
 * Run as root (it needs CAP_SETUID, CAP_SETGID, CAP_SETPCAP, CAP_SYS_ADMIN
 * for the namespaces and write access to the cgroups).  In this fixed
 * order, each step either succeeds or ends the process (exit status per
 * step, launcher.h), so nothing ever runs half-sandboxed:
 *
 *   cgroup        write our pid into each DIR/cgroup.procs
 *   unshare       IPC, UTS and mount namespaces; the mount namespace is made
 *                 a slave of the host's, so no mount propagates back
 *   daemonize     double fork + setsid; the first process waits until the
 *                 last one has exec'd (or failed) and exits 0 (or with the
 *                 failing step's status); the final pid goes to --pid-fd
 *   capabilities  empty the bounding and ambient sets (needs CAP_SETPCAP,
 *                 so before the ids change)
 *   credentials   no supplementary groups, setresgid G, setresuid U (never
 *                 0), all three ids checked afterwards
 *   capabilities  permitted, effective, inheritable emptied and checked
 *                 with capget; bounding and ambient checked empty
 *   no_new_privs  PR_SET_NO_NEW_PRIVS (no setuid/file-capability gain)
 *   landlock      a ruleset handling every right the kernel's ABI knows:
 *                 filesystem (--ro: read, --rx: read + execute, --rw: read
 *                 + write existing files; --ro-fd: read the file of an
 *                 inherited descriptor, kept open, through
 *                 /proc/self/fd/N: its uid need not reach its path), TCP bind/connect (ABI >= 4:
 *                 only the given ports), scoping of signals and abstract
 *                 unix sockets (ABI >= 6).  No Landlock: failure, never a
 *                 silent skip (the caller decides whether an operator
 *                 allowed running without the sandbox)
 *   close_fds     every descriptor but 0, 1, 2 and the --keep-fd ones is
 *                 closed (the status descriptor is close-on-exec)
 *   exec          execve(PROGRAM); the status descriptor closes with it
 *
 * Status protocol on --status-fd: "error <step>: <reason>\n" when a step
 * fails, "exec\n" just before execve; end of file then means the exec
 * happened (the descriptor is close-on-exec).  The same message goes to
 * stderr prefixed with the program's name.
 *
 * Linux only: on FreeBSD the device model sandboxes itself (Capsicum).
 * The shape follows Firecracker's jailer: one small program, one fixed
 * order, no step optional once asked for.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <grp.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <linux/capability.h>

#include "launcher.h"

#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_IS_SET 1
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif

#define PROG "nova-bhyve-launcher"

extern char **environ;

struct step {
	const char *name;
	int status;
};

static const struct step S_USAGE = { "usage", NBL_EXIT_USAGE };
static const struct step S_CGROUP = { "cgroup", NBL_EXIT_CGROUP };
static const struct step S_UNSHARE = { "unshare", NBL_EXIT_UNSHARE };
static const struct step S_DAEMONIZE = { "daemonize", NBL_EXIT_DAEMONIZE };
static const struct step S_CAPS = { "capabilities", NBL_EXIT_CAPABILITIES };
static const struct step S_CREDS = { "credentials", NBL_EXIT_CREDENTIALS };
static const struct step S_NNP = { "no_new_privs", NBL_EXIT_NO_NEW_PRIVS };
static const struct step S_LANDLOCK = { "landlock", NBL_EXIT_LANDLOCK };
static const struct step S_CLOSE = { "close_fds", NBL_EXIT_CLOSE_FDS };
static const struct step S_EXEC = { "exec", NBL_EXIT_EXEC };

struct options {
	uid_t uid;
	gid_t gid;
	int have_uid, have_gid;
	const char **cgroups;
	int ncgroups;
	int *keep_fds;
	int nkeep;
	const char **ro, **rx, **rw;
	int nro, nrx, nrw;
	int *ro_fds;            /* --ro-fd: read rules on inherited files */
	int nro_fds;
	uint16_t *bind_ports, *connect_ports;
	int nbind, nconnect;
	int unshare_flags;
	int status_fd;
	int daemonize;
	int pid_fd;
	char **argv;            /* PROGRAM ARGS... */
};

static int status_fd = -1;
/* daemonize: the write end of the pipe to the first process (one byte:
 * 0 = about to exec, else the failing step's exit status) */
static int report_fd = -1;

static void write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return;
		}
		buf += n;
		len -= (size_t)n;
	}
}

static void __attribute__((noreturn, format(printf, 2, 3)))
fail(const struct step *step, const char *fmt, ...)
{
	char reason[1024], line[1200];
	va_list ap;
	int n;

	va_start(ap, fmt);
	vsnprintf(reason, sizeof(reason), fmt, ap);
	va_end(ap);
	n = snprintf(line, sizeof(line), PROG ": error %s: %s\n",
		     step->name, reason);
	if (n > 0)
		write_all(2, line, strnlen(line, sizeof(line)));
	if (status_fd >= 0) {
		n = snprintf(line, sizeof(line), "error %s: %s\n",
			     step->name, reason);
		if (n > 0)
			write_all(status_fd, line, strnlen(line, sizeof(line)));
	}
	if (report_fd >= 0) {
		unsigned char code = (unsigned char)step->status;

		write_all(report_fd, (const char *)&code, 1);
	}
	_exit(step->status);
}

static void usage_text(FILE *out)
{
	fprintf(out,
		"usage: " PROG " --uid U --gid G [--cgroup DIR]... "
		"[--keep-fd N]...\n"
		"       [--ro PATH]... [--ro-fd N]... [--rx PATH]... [--rw PATH]...\n"
		"       [--bind-port P]... [--connect-port P]...\n"
		"       [--unshare ipc,uts,mount] [--status-fd N]\n"
		"       [--daemonize --pid-fd N] -- /PROGRAM [ARGS...]\n");
}

/* a decimal number in [min, max], nothing else */
static unsigned long parse_number(const char *opt, const char *s,
				  unsigned long min, unsigned long max)
{
	unsigned long v;
	char *end;

	if (*s < '0' || *s > '9')
		fail(&S_USAGE, "%s: not a number: '%s'", opt, s);
	errno = 0;
	v = strtoul(s, &end, 10);
	if (errno || *end != '\0' || v < min || v > max)
		fail(&S_USAGE, "%s: '%s' is not a number in [%lu, %lu]",
		     opt, s, min, max);
	return v;
}

static int parse_unshare(const char *list)
{
	char *copy = strdup(list), *save = NULL, *tok;
	int flags = 0;

	if (!copy)
		fail(&S_USAGE, "out of memory");
	for (tok = strtok_r(copy, ",", &save); tok;
	     tok = strtok_r(NULL, ",", &save)) {
		if (strcmp(tok, "ipc") == 0)
			flags |= CLONE_NEWIPC;
		else if (strcmp(tok, "uts") == 0)
			flags |= CLONE_NEWUTS;
		else if (strcmp(tok, "mount") == 0)
			flags |= CLONE_NEWNS;
		else
			fail(&S_USAGE, "--unshare: unknown namespace '%s' "
			     "(known: ipc, uts, mount)", tok);
	}
	free(copy);
	return flags;
}

static int fd_is_open(int fd)
{
	return fcntl(fd, F_GETFD) >= 0;
}

enum {
	OPT_UID = 256, OPT_GID, OPT_CGROUP, OPT_KEEP_FD, OPT_RO, OPT_RX,
	OPT_RW, OPT_BIND_PORT, OPT_CONNECT_PORT, OPT_UNSHARE, OPT_STATUS_FD,
	OPT_DAEMONIZE, OPT_PID_FD, OPT_RO_FD, OPT_HELP,
};

static const struct option long_options[] = {
	{ "uid", required_argument, NULL, OPT_UID },
	{ "gid", required_argument, NULL, OPT_GID },
	{ "cgroup", required_argument, NULL, OPT_CGROUP },
	{ "keep-fd", required_argument, NULL, OPT_KEEP_FD },
	{ "ro", required_argument, NULL, OPT_RO },
	{ "ro-fd", required_argument, NULL, OPT_RO_FD },
	{ "rx", required_argument, NULL, OPT_RX },
	{ "rw", required_argument, NULL, OPT_RW },
	{ "bind-port", required_argument, NULL, OPT_BIND_PORT },
	{ "connect-port", required_argument, NULL, OPT_CONNECT_PORT },
	{ "unshare", required_argument, NULL, OPT_UNSHARE },
	{ "status-fd", required_argument, NULL, OPT_STATUS_FD },
	{ "daemonize", no_argument, NULL, OPT_DAEMONIZE },
	{ "pid-fd", required_argument, NULL, OPT_PID_FD },
	{ "help", no_argument, NULL, OPT_HELP },
	{ NULL, 0, NULL, 0 },
};

static void *array_for(int argc, size_t size)
{
	void *p = calloc((size_t)argc + 1, size);

	if (!p)
		fail(&S_USAGE, "out of memory");
	return p;
}

static void parse_options(int argc, char **argv, struct options *o)
{
	const unsigned long fd_max = INT_MAX;
	int c, i;

	memset(o, 0, sizeof(*o));
	o->status_fd = -1;
	o->pid_fd = -1;
	o->cgroups = array_for(argc, sizeof(char *));
	o->ro = array_for(argc, sizeof(char *));
	o->rx = array_for(argc, sizeof(char *));
	o->rw = array_for(argc, sizeof(char *));
	o->keep_fds = array_for(argc, sizeof(int));
	o->ro_fds = array_for(argc, sizeof(int));
	o->bind_ports = array_for(argc, sizeof(uint16_t));
	o->connect_ports = array_for(argc, sizeof(uint16_t));

	opterr = 0;
	while ((c = getopt_long(argc, argv, "+", long_options, NULL)) != -1) {
		switch (c) {
		case OPT_UID:
			o->uid = (uid_t)parse_number("--uid", optarg, 0,
						     UINT32_MAX - 1);
			o->have_uid = 1;
			break;
		case OPT_GID:
			o->gid = (gid_t)parse_number("--gid", optarg, 0,
						     UINT32_MAX - 1);
			o->have_gid = 1;
			break;
		case OPT_CGROUP:
			o->cgroups[o->ncgroups++] = optarg;
			break;
		case OPT_KEEP_FD:
			o->keep_fds[o->nkeep++] = (int)parse_number(
				"--keep-fd", optarg, 3, fd_max);
			break;
		case OPT_RO:
			o->ro[o->nro++] = optarg;
			break;
		case OPT_RO_FD:
			/* the descriptor is kept open for the program too */
			o->ro_fds[o->nro_fds] = (int)parse_number(
				"--ro-fd", optarg, 3, fd_max);
			o->keep_fds[o->nkeep++] = o->ro_fds[o->nro_fds++];
			break;
		case OPT_RX:
			o->rx[o->nrx++] = optarg;
			break;
		case OPT_RW:
			o->rw[o->nrw++] = optarg;
			break;
		case OPT_BIND_PORT:
			o->bind_ports[o->nbind++] = (uint16_t)parse_number(
				"--bind-port", optarg, 0, 65535);
			break;
		case OPT_CONNECT_PORT:
			o->connect_ports[o->nconnect++] =
				(uint16_t)parse_number("--connect-port",
						       optarg, 0, 65535);
			break;
		case OPT_UNSHARE:
			o->unshare_flags |= parse_unshare(optarg);
			break;
		case OPT_STATUS_FD:
			o->status_fd = (int)parse_number("--status-fd", optarg,
							 3, fd_max);
			break;
		case OPT_DAEMONIZE:
			o->daemonize = 1;
			break;
		case OPT_PID_FD:
			o->pid_fd = (int)parse_number("--pid-fd", optarg, 3,
						      fd_max);
			break;
		case OPT_HELP:
			usage_text(stdout);
			exit(0);
		default:
			fail(&S_USAGE, "unknown or incomplete option '%s'",
			     argv[optind - 1]);
		}
	}

	/* the status descriptor first: every later message goes there too */
	if (o->status_fd >= 0) {
		if (fcntl(o->status_fd, F_SETFD, FD_CLOEXEC) < 0)
			fail(&S_USAGE, "--status-fd %d: %s", o->status_fd,
			     strerror(errno));
		status_fd = o->status_fd;
	}
	if (!o->have_uid || !o->have_gid)
		fail(&S_USAGE, "--uid and --gid are required");
	if (o->uid == 0)
		fail(&S_CREDS, "uid 0 refused: the program must not run as "
		     "root");
	if (o->gid == 0)
		fail(&S_CREDS, "gid 0 refused: the program must not run in "
		     "group root");
	if (o->daemonize != (o->pid_fd >= 0))
		fail(&S_USAGE, "--daemonize and --pid-fd go together");
	if (o->pid_fd >= 0 && !fd_is_open(o->pid_fd))
		fail(&S_USAGE, "--pid-fd %d is not open", o->pid_fd);
	for (i = 0; i < o->nkeep; i++)
		if (o->keep_fds[i] == o->status_fd)
			fail(&S_USAGE, "--keep-fd %d is the status descriptor",
			     o->keep_fds[i]);
	if (optind >= argc)
		fail(&S_USAGE, "no program given (after --)");
	if (argv[optind][0] != '/')
		fail(&S_USAGE, "the program must be an absolute path, not "
		     "'%s'", argv[optind]);
	o->argv = argv + optind;
}

/* -- a) cgroup ----------------------------------------------------------- */

static void join_cgroups(const struct options *o)
{
	char path[PATH_MAX], pid[32];
	int i, fd, n;

	n = snprintf(pid, sizeof(pid), "%ld\n", (long)getpid());
	for (i = 0; i < o->ncgroups; i++) {
		if (snprintf(path, sizeof(path), "%s/cgroup.procs",
			     o->cgroups[i]) >= (int)sizeof(path))
			fail(&S_CGROUP, "path too long: %s", o->cgroups[i]);
		fd = open(path, O_WRONLY | O_CLOEXEC);
		if (fd < 0)
			fail(&S_CGROUP, "cannot open %s: %s", path,
			     strerror(errno));
		if (write(fd, pid, (size_t)n) != n)
			fail(&S_CGROUP, "cannot join %s: %s", o->cgroups[i],
			     strerror(errno));
		close(fd);
	}
}

/* -- b) unshare ---------------------------------------------------------- */

static void unshare_namespaces(const struct options *o)
{
	if (!o->unshare_flags)
		return;
	if (unshare(o->unshare_flags) < 0)
		fail(&S_UNSHARE, "unshare(%s%s%s): %s",
		     o->unshare_flags & CLONE_NEWIPC ? "ipc " : "",
		     o->unshare_flags & CLONE_NEWUTS ? "uts " : "",
		     o->unshare_flags & CLONE_NEWNS ? "mount" : "",
		     strerror(errno));
	/* receive the host's mounts, never send ours back */
	if ((o->unshare_flags & CLONE_NEWNS) &&
	    mount(NULL, "/", NULL, MS_REC | MS_SLAVE, NULL) < 0)
		fail(&S_UNSHARE, "cannot make / a slave mount: %s",
		     strerror(errno));
}

/* -- c) daemonize -------------------------------------------------------- */

static void daemonize(const struct options *o)
{
	unsigned char code;
	char buf[32];
	int p[2], n, got = 0, code_seen = 0;
	pid_t pid;

	if (!o->daemonize)
		return;
	if (pipe2(p, O_CLOEXEC) < 0)
		fail(&S_DAEMONIZE, "pipe: %s", strerror(errno));
	pid = fork();
	if (pid < 0)
		fail(&S_DAEMONIZE, "fork: %s", strerror(errno));
	if (pid > 0) {
		/* the first process: wait for the outcome, then leave */
		close(p[1]);
		while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
			;
		for (;;) {
			n = (int)read(p[0], &code, 1);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0)
				break;
			got++;
			if (code != 0) {
				code_seen = code;
				break;
			}
		}
		if (code_seen)
			_exit(code_seen);        /* the failing step said why */
		if (got == 0) {
			/* report_fd is not ours: say it here */
			fail(&S_DAEMONIZE, "the sandboxed process ended before "
			     "its exec");
		}
		_exit(0);
	}
	/* the intermediate process: a new session, then the final fork */
	close(p[0]);
	report_fd = p[1];
	if (setsid() < 0)
		fail(&S_DAEMONIZE, "setsid: %s", strerror(errno));
	pid = fork();
	if (pid < 0)
		fail(&S_DAEMONIZE, "second fork: %s", strerror(errno));
	if (pid > 0)
		_exit(0);
	/* the final process: not a session leader, never gets a terminal */
	n = snprintf(buf, sizeof(buf), "%ld\n", (long)getpid());
	if (write(o->pid_fd, buf, (size_t)n) != n)
		fail(&S_DAEMONIZE, "cannot write the pid to --pid-fd %d: %s",
		     o->pid_fd, strerror(errno));
	if (chdir("/") < 0)
		fail(&S_DAEMONIZE, "chdir /: %s", strerror(errno));
}

/* -- d) capabilities and credentials ------------------------------------- */

static int last_cap(void)
{
	int cap = 0;

	while (prctl(PR_CAPBSET_READ, (unsigned long)cap, 0, 0, 0) >= 0)
		cap++;
	return cap - 1;
}

static void drop_bounding_and_ambient(void)
{
	int cap, top = last_cap();

	if (top < 0)
		fail(&S_CAPS, "cannot read the bounding set: %s",
		     strerror(errno));
	for (cap = 0; cap <= top; cap++) {
		if (prctl(PR_CAPBSET_READ, (unsigned long)cap, 0, 0, 0) == 0)
			continue;
		if (prctl(PR_CAPBSET_DROP, (unsigned long)cap, 0, 0, 0) < 0)
			fail(&S_CAPS, "cannot drop capability %d from the "
			     "bounding set: %s", cap, strerror(errno));
	}
	if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0)
		fail(&S_CAPS, "cannot clear the ambient set: %s",
		     strerror(errno));
}

static void change_ids(const struct options *o)
{
	uid_t ru, eu, su;
	gid_t rg, eg, sg;

	if (setgroups(0, NULL) < 0)
		fail(&S_CREDS, "setgroups(0): %s", strerror(errno));
	if (setresgid(o->gid, o->gid, o->gid) < 0)
		fail(&S_CREDS, "setresgid(%lu): %s", (unsigned long)o->gid,
		     strerror(errno));
	if (setresuid(o->uid, o->uid, o->uid) < 0)
		fail(&S_CREDS, "setresuid(%lu): %s", (unsigned long)o->uid,
		     strerror(errno));
	if (getresuid(&ru, &eu, &su) < 0 || getresgid(&rg, &eg, &sg) < 0)
		fail(&S_CREDS, "cannot read back the ids: %s",
		     strerror(errno));
	if (ru != o->uid || eu != o->uid || su != o->uid ||
	    rg != o->gid || eg != o->gid || sg != o->gid)
		fail(&S_CREDS, "ids are not what was set");
	if (getgroups(0, NULL) != 0)
		fail(&S_CREDS, "supplementary groups remain");
}

static void clear_and_check_capabilities(void)
{
	struct __user_cap_header_struct hdr;
	struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];
	int cap, top, i;

	memset(&hdr, 0, sizeof(hdr));
	memset(data, 0, sizeof(data));
	hdr.version = _LINUX_CAPABILITY_VERSION_3;
	if (syscall(SYS_capset, &hdr, data) < 0)
		fail(&S_CAPS, "capset: %s", strerror(errno));
	memset(&hdr, 0, sizeof(hdr));
	hdr.version = _LINUX_CAPABILITY_VERSION_3;
	if (syscall(SYS_capget, &hdr, data) < 0)
		fail(&S_CAPS, "capget: %s", strerror(errno));
	for (i = 0; i < _LINUX_CAPABILITY_U32S_3; i++)
		if (data[i].permitted || data[i].effective ||
		    data[i].inheritable)
			fail(&S_CAPS, "capabilities remain after the uid "
			     "change");
	top = last_cap();
	for (cap = 0; cap <= top; cap++) {
		if (prctl(PR_CAPBSET_READ, (unsigned long)cap, 0, 0, 0) != 0)
			fail(&S_CAPS, "capability %d is still in the bounding "
			     "set", cap);
		if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET,
			  (unsigned long)cap, 0, 0) != 0)
			fail(&S_CAPS, "capability %d is still ambient", cap);
	}
}

/* -- e) no_new_privs ----------------------------------------------------- */

static void set_no_new_privs(void)
{
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		fail(&S_NNP, "prctl(PR_SET_NO_NEW_PRIVS): %s", strerror(errno));
	if (prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1)
		fail(&S_NNP, "no_new_privs is not set");
}

/* -- f) landlock --------------------------------------------------------- */

static void add_path_rules(int ruleset, const char **paths, int n,
			   uint64_t access, uint64_t handled, const char *opt)
{
	struct nbl_path_beneath_attr rule;
	struct stat st;
	int i, fd;

	for (i = 0; i < n; i++) {
		fd = open(paths[i], O_PATH | O_CLOEXEC);
		if (fd < 0)
			fail(&S_LANDLOCK, "%s %s: %s", opt, paths[i],
			     strerror(errno));
		if (fstat(fd, &st) < 0)
			fail(&S_LANDLOCK, "%s %s: %s", opt, paths[i],
			     strerror(errno));
		memset(&rule, 0, sizeof(rule));
		rule.allowed_access = access & handled;
		if (!S_ISDIR(st.st_mode))
			rule.allowed_access &= NBL_LL_FS_FILE_RIGHTS;
		rule.parent_fd = fd;
		if (syscall(NBL_NR_landlock_add_rule, ruleset,
			    NBL_LL_RULE_PATH_BENEATH, &rule, 0) < 0)
			fail(&S_LANDLOCK, "%s %s: cannot add the rule: %s", opt,
			     paths[i], strerror(errno));
		close(fd);
	}
}

/* Read rules on inherited descriptors: the program may read those files
 * (through /proc/self/fd/N) although its uid may not reach their paths. */
static void add_fd_rules(int ruleset, const int *fds, int n,
			 uint64_t access, uint64_t handled)
{
	struct nbl_path_beneath_attr rule;
	struct stat st;
	int i;

	for (i = 0; i < n; i++) {
		if (fstat(fds[i], &st) < 0)
			fail(&S_LANDLOCK, "--ro-fd %d: %s", fds[i],
			     strerror(errno));
		memset(&rule, 0, sizeof(rule));
		rule.allowed_access = access & handled;
		if (!S_ISDIR(st.st_mode))
			rule.allowed_access &= NBL_LL_FS_FILE_RIGHTS;
		rule.parent_fd = fds[i];
		if (syscall(NBL_NR_landlock_add_rule, ruleset,
			    NBL_LL_RULE_PATH_BENEATH, &rule, 0) < 0)
			fail(&S_LANDLOCK, "--ro-fd %d: cannot add the rule: %s",
			     fds[i], strerror(errno));
	}
}

static void add_port_rules(int ruleset, const uint16_t *ports, int n,
			   uint64_t access, const char *opt)
{
	struct nbl_net_port_attr rule;
	int i;

	for (i = 0; i < n; i++) {
		memset(&rule, 0, sizeof(rule));
		rule.allowed_access = access;
		rule.port = ports[i];
		if (syscall(NBL_NR_landlock_add_rule, ruleset,
			    NBL_LL_RULE_NET_PORT, &rule, 0) < 0)
			fail(&S_LANDLOCK, "%s %u: cannot add the rule: %s", opt,
			     (unsigned)ports[i], strerror(errno));
	}
}

static void apply_landlock(const struct options *o)
{
	struct nbl_ruleset_attr attr;
	uint64_t read = NBL_LL_FS_READ_FILE | NBL_LL_FS_READ_DIR;
	size_t size = NBL_RULESET_ATTR_SIZE_ABI1;
	long abi;
	int ruleset;

	abi = syscall(NBL_NR_landlock_create_ruleset, NULL, 0,
		      NBL_LL_CREATE_RULESET_VERSION);
	if (abi < 0)
		fail(&S_LANDLOCK, "the kernel has no Landlock (%s)",
		     errno == EOPNOTSUPP ? "disabled at boot: add landlock "
		     "to the lsm= kernel parameter" : strerror(errno));

	memset(&attr, 0, sizeof(attr));
	attr.handled_access_fs = NBL_LL_FS_ABI1;
	if (abi >= 2)
		attr.handled_access_fs |= NBL_LL_FS_REFER;
	if (abi >= 3)
		attr.handled_access_fs |= NBL_LL_FS_TRUNCATE;
	if (abi >= 5)
		attr.handled_access_fs |= NBL_LL_FS_IOCTL_DEV;
	if (abi >= 4) {
		attr.handled_access_net = NBL_LL_NET_BIND_TCP |
			NBL_LL_NET_CONNECT_TCP;
		size = NBL_RULESET_ATTR_SIZE_ABI4;
	}
	if (abi >= 6) {
		attr.scoped = NBL_LL_SCOPE_ABSTRACT_UNIX_SOCKET |
			NBL_LL_SCOPE_SIGNAL;
		size = NBL_RULESET_ATTR_SIZE_ABI6;
	}
	ruleset = (int)syscall(NBL_NR_landlock_create_ruleset, &attr, size,
			       0);
	if (ruleset < 0)
		fail(&S_LANDLOCK, "cannot create a ruleset (ABI %ld): %s", abi,
		     strerror(errno));

	add_path_rules(ruleset, o->ro, o->nro, read, attr.handled_access_fs,
		       "--ro");
	add_fd_rules(ruleset, o->ro_fds, o->nro_fds, read,
		     attr.handled_access_fs);
	add_path_rules(ruleset, o->rx, o->nrx, read | NBL_LL_FS_EXECUTE,
		       attr.handled_access_fs, "--rx");
	add_path_rules(ruleset, o->rw, o->nrw,
		       read | NBL_LL_FS_WRITE_FILE | NBL_LL_FS_TRUNCATE |
		       NBL_LL_FS_IOCTL_DEV, attr.handled_access_fs, "--rw");
	if (abi >= 4) {
		add_port_rules(ruleset, o->bind_ports, o->nbind,
			       NBL_LL_NET_BIND_TCP, "--bind-port");
		add_port_rules(ruleset, o->connect_ports, o->nconnect,
			       NBL_LL_NET_CONNECT_TCP, "--connect-port");
	}
	if (syscall(NBL_NR_landlock_restrict_self, ruleset, 0) < 0)
		fail(&S_LANDLOCK, "landlock_restrict_self: %s",
		     strerror(errno));
	close(ruleset);
}

/* -- g) close_fds -------------------------------------------------------- */

static int cmp_int(const void *a, const void *b)
{
	int x = *(const int *)a, y = *(const int *)b;

	return (x > y) - (x < y);
}

static void close_range_or_loop(unsigned int lo, unsigned int hi)
{
	struct rlimit rl;
	unsigned int fd;

	if (lo > hi)
		return;
	if (syscall(SYS_close_range, lo, hi, 0) == 0)
		return;
	if (errno != ENOSYS)
		fail(&S_CLOSE, "close_range(%u, %u): %s", lo, hi,
		     strerror(errno));
	/* no close_range (Linux < 5.9): /proc may be out of reach already */
	if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
		fail(&S_CLOSE, "getrlimit: %s", strerror(errno));
	if (rl.rlim_cur != RLIM_INFINITY && hi >= rl.rlim_cur)
		hi = (unsigned int)rl.rlim_cur - 1;
	for (fd = lo; fd <= hi && fd >= lo; fd++)
		close((int)fd);
}

static void close_descriptors(const struct options *o)
{
	int *keep = array_for(o->nkeep + 4, sizeof(int));
	unsigned int next = 3;
	int i, n = 0;

	for (i = 0; i < o->nkeep; i++) {
		/* kept descriptors must survive the exec */
		if (fcntl(o->keep_fds[i], F_SETFD, 0) < 0)
			fail(&S_CLOSE, "--keep-fd %d: %s", o->keep_fds[i],
			     strerror(errno));
		keep[n++] = o->keep_fds[i];
	}
	/* close-on-exec: the exec closes them, telling the waiting side */
	if (status_fd >= 0)
		keep[n++] = status_fd;
	if (report_fd >= 0)
		keep[n++] = report_fd;
	qsort(keep, (size_t)n, sizeof(int), cmp_int);
	for (i = 0; i < n; i++) {
		if ((unsigned int)keep[i] >= next)
			close_range_or_loop(next, (unsigned int)keep[i] - 1);
		if ((unsigned int)keep[i] + 1 > next)
			next = (unsigned int)keep[i] + 1;
	}
	close_range_or_loop(next, ~0U);
	free(keep);
}

/* -- h) exec ------------------------------------------------------------- */

static void exec_program(const struct options *o)
{
	static const char msg[] = "exec\n";
	sigset_t none;
	unsigned char zero = 0;

	sigemptyset(&none);
	if (sigprocmask(SIG_SETMASK, &none, NULL) < 0)
		fail(&S_EXEC, "sigprocmask: %s", strerror(errno));
	if (status_fd >= 0)
		write_all(status_fd, msg, sizeof(msg) - 1);
	if (report_fd >= 0)
		write_all(report_fd, (const char *)&zero, 1);
	execve(o->argv[0], o->argv, environ);
	fail(&S_EXEC, "cannot execute %s: %s", o->argv[0], strerror(errno));
}

int main(int argc, char **argv)
{
	struct options o;

	parse_options(argc, argv, &o);
	join_cgroups(&o);                       /* a */
	unshare_namespaces(&o);                 /* b */
	daemonize(&o);                          /* c */
	drop_bounding_and_ambient();            /* d */
	change_ids(&o);
	clear_and_check_capabilities();
	set_no_new_privs();                     /* e */
	apply_landlock(&o);                     /* f */
	close_descriptors(&o);                  /* g */
	exec_program(&o);                       /* h */
	return NBL_EXIT_EXEC;
}
