/*
 * nova-bhyve-launcher: the steps, their exit statuses, and the Landlock
 * ABI this program knows.
 *
 * The exit statuses are part of the interface: nova_bhyve/sandbox/
 * launcher.py mirrors them (a unit test compares the two).
 *
 * Landlock: Debian 12's linux-libc-dev (6.1) knows ABI 1-2 and a
 * landlock_ruleset_attr with one field.  Everything used here is defined
 * under this program's own names, from the kernel's UAPI
 * (include/uapi/linux/landlock.h), so the build does not depend on the
 * installed headers and a newer kernel's ABI is used when it is there.
 */
#ifndef NOVA_BHYVE_LAUNCHER_H
#define NOVA_BHYVE_LAUNCHER_H

#include <stdint.h>

/* exit statuses, one per step (0: never returned by a failing step) */
#define NBL_EXIT_USAGE          2
#define NBL_EXIT_CGROUP         10
#define NBL_EXIT_UNSHARE        11
#define NBL_EXIT_DAEMONIZE      12
#define NBL_EXIT_CAPABILITIES   13
#define NBL_EXIT_CREDENTIALS    14
#define NBL_EXIT_NO_NEW_PRIVS   15
#define NBL_EXIT_LANDLOCK       16
#define NBL_EXIT_CLOSE_FDS      17
#define NBL_EXIT_EXEC           18

/* Landlock system calls (x86_64 and every architecture since 5.13) */
#define NBL_NR_landlock_create_ruleset  444
#define NBL_NR_landlock_add_rule        445
#define NBL_NR_landlock_restrict_self   446

#define NBL_LL_CREATE_RULESET_VERSION   (1U << 0)

/* rule types */
#define NBL_LL_RULE_PATH_BENEATH        1
#define NBL_LL_RULE_NET_PORT            2       /* ABI 4 */

/* filesystem access rights */
#define NBL_LL_FS_EXECUTE       (1ULL << 0)
#define NBL_LL_FS_WRITE_FILE    (1ULL << 1)
#define NBL_LL_FS_READ_FILE     (1ULL << 2)
#define NBL_LL_FS_READ_DIR      (1ULL << 3)
#define NBL_LL_FS_REMOVE_DIR    (1ULL << 4)
#define NBL_LL_FS_REMOVE_FILE   (1ULL << 5)
#define NBL_LL_FS_MAKE_CHAR     (1ULL << 6)
#define NBL_LL_FS_MAKE_DIR      (1ULL << 7)
#define NBL_LL_FS_MAKE_REG      (1ULL << 8)
#define NBL_LL_FS_MAKE_SOCK     (1ULL << 9)
#define NBL_LL_FS_MAKE_FIFO     (1ULL << 10)
#define NBL_LL_FS_MAKE_BLOCK    (1ULL << 11)
#define NBL_LL_FS_MAKE_SYM      (1ULL << 12)
#define NBL_LL_FS_REFER         (1ULL << 13)    /* ABI 2 */
#define NBL_LL_FS_TRUNCATE      (1ULL << 14)    /* ABI 3 */
#define NBL_LL_FS_IOCTL_DEV     (1ULL << 15)    /* ABI 5 */

#define NBL_LL_FS_ABI1          ((1ULL << 13) - 1)

/* the rights that make sense on a file (not a directory) */
#define NBL_LL_FS_FILE_RIGHTS   (NBL_LL_FS_EXECUTE | NBL_LL_FS_WRITE_FILE | \
                                 NBL_LL_FS_READ_FILE | NBL_LL_FS_TRUNCATE | \
                                 NBL_LL_FS_IOCTL_DEV)

/* network access rights (ABI 4) */
#define NBL_LL_NET_BIND_TCP     (1ULL << 0)
#define NBL_LL_NET_CONNECT_TCP  (1ULL << 1)

/* scopes (ABI 6) */
#define NBL_LL_SCOPE_ABSTRACT_UNIX_SOCKET  (1ULL << 0)
#define NBL_LL_SCOPE_SIGNAL                (1ULL << 1)

/* struct landlock_ruleset_attr as of ABI 6; its size given to the kernel
 * is cut down to what the running kernel knows (see launcher.c) */
struct nbl_ruleset_attr {
	uint64_t handled_access_fs;
	uint64_t handled_access_net;    /* ABI 4 */
	uint64_t scoped;                /* ABI 6 */
};

#define NBL_RULESET_ATTR_SIZE_ABI1  8
#define NBL_RULESET_ATTR_SIZE_ABI4  16
#define NBL_RULESET_ATTR_SIZE_ABI6  24

struct nbl_path_beneath_attr {
	uint64_t allowed_access;
	int32_t parent_fd;
} __attribute__((packed));

struct nbl_net_port_attr {
	uint64_t allowed_access;
	uint64_t port;
};

#endif /* NOVA_BHYVE_LAUNCHER_H */
