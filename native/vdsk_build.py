"""cffi builder for nova_bhyve._vdsk (libvdsk compiled into the module).

setuptools runs this from the project root (cffi_modules in setup.py); it
also works when imported from elsewhere, so paths are derived from this
file and made relative to the working directory when they can be, as
setuptools prefers relative source paths.

The declarations given to cffi are vdsk.h's own (cdef() below), the C
files those listed in vdsk/sources.list.  The C code is compiled with
-Wall -Wextra, plus -Werror when CI=true or VDSK_WERROR=1.

VDSK_SANITIZE=1 in the environment builds an ASan+UBSan variant (for the
test suite only: it needs the sanitizer runtimes preloaded into Python,
see tools/run-tests).  Run as a script, this builds the module into the
directory given as the argument (default: the working directory):

    VDSK_SANITIZE=1 python native/vdsk_build.py native/_build/asan-python
"""
import glob
import os
import re
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


def _read(*parts):
    with open(os.path.join(_VDSK, *parts)) as f:
        return f.read()


def cdef():
    """The binding's declarations: vdsk.h between its "cffi cdef begin"
    comment and "cffi cdef end", so they cannot drift from the header."""
    m = re.search(r'cffi cdef begin:.*?\*/(.*)/\* cffi cdef end \*/',
                  _read('include', 'vdsk.h'), re.S)
    if m is None:
        raise RuntimeError('vdsk.h: no "cffi cdef begin/end" markers')
    return m.group(1)


def sources():
    """The library's C files, one a line in vdsk/sources.list (which
    native/Makefile reads too)."""
    return _read('sources.list').split()


def headers():
    return sorted(glob.glob(os.path.join(_VDSK, '*.h')) +
                  glob.glob(os.path.join(_VDSK, 'include', '*.h')))


# -Werror in CI (CI=true, as CI systems set it) or on request: the build
# must stay warning-free, but a user's newer compiler must not break
# pip install.
WERROR = os.environ.get('CI', '').lower() == 'true' or \
    os.environ.get('VDSK_WERROR', '') not in ('', '0')
WARN_FLAGS = ['-Wall', '-Wextra'] + (['-Werror'] if WERROR else [])

# -fno-sanitize-recover: any UBSan finding aborts, as ASan's do;
# -fno-wrapv undoes Python's -fwrapv, which hides signed overflow from UBSan
SANITIZE_FLAGS = ['-O1', '-g', '-fno-omit-frame-pointer', '-fno-wrapv',
                  '-fsanitize=address,undefined',
                  '-fno-sanitize-recover=undefined']
SANITIZE = os.environ.get('VDSK_SANITIZE', '') not in ('', '0')

ffibuilder = cffi.FFI()
ffibuilder.cdef(cdef())
ffibuilder.set_source(
    'nova_bhyve._vdsk',
    '#include "vdsk.h"',
    sources=[_path(f) for f in sources()],
    include_dirs=[_path('include'), _path()],
    depends=[_path(os.path.relpath(h, _VDSK)) for h in headers()] +
    [_path('sources.list')],
    extra_compile_args=WARN_FLAGS + (SANITIZE_FLAGS if SANITIZE else []),
    extra_link_args=SANITIZE_FLAGS if SANITIZE else [],
    libraries=['z', 'zstd', 'pthread'],
)

if __name__ == '__main__':
    ffibuilder.compile(tmpdir=sys.argv[1] if len(sys.argv) > 1 else '.',
                       verbose=True)
