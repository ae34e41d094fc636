"""cffi builder for nova_bhyve._vdsk (libvdsk compiled into the module).

setuptools runs this from the project root (cffi_modules in setup.py); it
also works when imported from elsewhere, so paths are derived from this
file and made relative to the working directory when they can be, as
setuptools prefers relative source paths.

VDSK_SANITIZE=1 in the environment builds an ASan+UBSan variant (for the
test suite only: it needs the sanitizer runtimes preloaded into Python,
see tools/run-tests).  Run as a script, this builds the module into the
directory given as the argument (default: the working directory):

    VDSK_SANITIZE=1 python native/vdsk_build.py native/_build/asan-python
"""
import glob
import os
import sys

import cffi

_HERE = os.path.dirname(os.path.abspath(__file__))
_VDSK = os.path.join(_HERE, 'vdsk')


def _path(*parts):
    p = os.path.join(_VDSK, *parts)
    if __name__ == '__main__':
        return p        # ffibuilder.compile() works in its tmpdir
    rel = os.path.relpath(p)
    return p if rel.startswith('..') else rel


CDEF = """
typedef struct vdsk vdsk_t;

#define VDSK_RDONLY ...
#define VDSK_NO_BACKING ...
#define VDSK_FMT_MAX ...
#define VDSK_PATH_MAX ...

struct vdsk_info {
    char format[...];
    uint64_t virtual_size;
    uint32_t cluster_size;
    uint32_t version;
    char backing_file[...];
    char backing_format[...];
    uint64_t actual_size;
    int dirty;
    uint32_t nb_snapshots;
    ...;
};

struct vdsk_snapshot {
    char id[...];
    char name[...];
    uint64_t vm_state_size;
    uint64_t disk_size;
    int64_t date_sec;
    uint32_t date_nsec;
    uint64_t vm_clock_nsec;
    ...;
};

#define VDSK_CHECK_REPAIR_LEAKS ...

struct vdsk_check {
    uint64_t corruptions;
    uint64_t leaks;
    uint64_t corruptions_fixed;
    uint64_t leaks_fixed;
    uint64_t allocated_clusters;
    uint64_t total_clusters;
    ...;
};

int vdsk_create(const char *path, const char *fmt, uint64_t size,
    const char *backing, const char *backing_fmt, uint32_t cluster_size);
int vdsk_create_subformat(const char *path, const char *fmt,
    const char *subformat, uint64_t size, const char *backing,
    const char *backing_fmt, uint32_t cluster_size);
vdsk_t *vdsk_open(const char *path, const char *fmt, int flags);
int vdsk_close(vdsk_t *d);
uint64_t vdsk_size(const vdsk_t *d);
int vdsk_read(vdsk_t *d, void *buf, uint64_t off, size_t len);
int vdsk_write(vdsk_t *d, const void *buf, uint64_t off, size_t len);
int vdsk_flush(vdsk_t *d);
int vdsk_info(vdsk_t *d, struct vdsk_info *info);
int vdsk_discard(vdsk_t *d, uint64_t off, uint64_t len);
int vdsk_resize(vdsk_t *d, uint64_t size);
int vdsk_write_compressed(vdsk_t *d, const void *buf, uint64_t off,
    size_t len);
int vdsk_snapshot_create(vdsk_t *d, const char *name);
int vdsk_snapshot_list(vdsk_t *d, struct vdsk_snapshot *out, int max);
int vdsk_snapshot_apply(vdsk_t *d, const char *name);
int vdsk_snapshot_delete(vdsk_t *d, const char *name);
int vdsk_check(const char *path, const char *fmt, int flags,
    struct vdsk_check *res);
int vdsk_errno(void);
const char *vdsk_errmsg(void);

struct vdsk_open_opts {
    uint64_t l2_cache_size;
    ...;
};
vdsk_t *vdsk_open2(const char *path, const char *fmt, int flags,
    const struct vdsk_open_opts *opts);

#define VDSK_BS_DATA ...
#define VDSK_BS_ZERO ...
#define VDSK_BS_UNALLOCATED ...
int vdsk_block_status(vdsk_t *d, uint64_t off, uint64_t len, uint64_t *pnum);

#define VDSK_CONVERT_COMPRESS ...
#define VDSK_CONVERT_NO_FLUSH ...
struct vdsk_convert_opts {
    int workers;
    uint32_t buf_size;
    uint32_t cluster_size;
    int flags;
    ...;
};
int vdsk_convert(const char *src, const char *src_fmt, const char *dst,
    const char *dst_fmt, const struct vdsk_convert_opts *opts);
int vdsk_commit(const char *path, const char *fmt);
int vdsk_rebase(const char *path, const char *fmt, const char *backing,
    const char *backing_fmt, int unsafe);

struct vdsk_bench_opts {
    int write;
    int random;
    int threads;
    uint32_t bs;
    uint64_t count;
    uint64_t offset;
    uint64_t step;
    uint64_t seed;
    int flush_interval;
    ...;
};
struct vdsk_bench_result {
    double seconds;
    uint64_t requests;
    uint64_t bytes;
    ...;
};
int vdsk_bench(const char *path, const char *fmt,
    const struct vdsk_bench_opts *opts, struct vdsk_bench_result *res);
"""

def _read(*parts):
    with open(os.path.join(_VDSK, *parts)) as f:
        return f.read()


def sources():
    """The library's C files, one a line in vdsk/sources.list (which
    native/Makefile reads too)."""
    return _read('sources.list').split()


def headers():
    return sorted(glob.glob(os.path.join(_VDSK, '*.h')) +
                  glob.glob(os.path.join(_VDSK, 'include', '*.h')))


# -fno-sanitize-recover: any UBSan finding aborts, as ASan's do;
# -fno-wrapv undoes Python's -fwrapv, which hides signed overflow from UBSan
SANITIZE_FLAGS = ['-O1', '-g', '-fno-omit-frame-pointer', '-fno-wrapv',
                  '-fsanitize=address,undefined',
                  '-fno-sanitize-recover=undefined']
SANITIZE = os.environ.get('VDSK_SANITIZE', '') not in ('', '0')

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    'nova_bhyve._vdsk',
    '#include "vdsk.h"',
    sources=[_path(f) for f in sources()],
    include_dirs=[_path('include'), _path()],
    depends=[_path(os.path.relpath(h, _VDSK)) for h in headers()] +
    [_path('sources.list')],
    extra_compile_args=['-Wall', '-Wextra'] +
    (SANITIZE_FLAGS if SANITIZE else []),
    extra_link_args=SANITIZE_FLAGS if SANITIZE else [],
    libraries=['z', 'zstd', 'pthread'],
)

if __name__ == '__main__':
    ffibuilder.compile(tmpdir=sys.argv[1] if len(sys.argv) > 1 else '.',
                       verbose=True)
