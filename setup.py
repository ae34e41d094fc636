"""Build script: the metadata lives in setup.cfg; this only adds the native
code: libvdsk, which cffi compiles from native/ whenever the package is
installed, and the console logger (native/conlog), compiled into the
package as nova_bhyve/libexec/nova-bhyve-conlog."""
import os
import shlex
import subprocess
import sysconfig

import setuptools
from setuptools.command import build_py

CONLOG_SRC = os.path.join('native', 'conlog', 'conlog.c')
CONLOG = os.path.join('nova_bhyve', 'libexec', 'nova-bhyve-conlog')


class BuildPyWithConlog(build_py.build_py):
    """build_py, then the console logger next to the Python modules."""

    def run(self):
        super().run()
        out = os.path.join(self.build_lib, CONLOG)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        cc = shlex.split(os.environ.get('CC') or
                         sysconfig.get_config_var('CC') or 'cc')[:1]
        cmd = cc + ['-O2', '-Wall', '-Wextra', '-Werror', '-o', out,
                    CONLOG_SRC]
        self.announce(' '.join(cmd), level=2)
        subprocess.check_call(cmd)
        os.chmod(out, 0o755)


setuptools.setup(
    version='0.1.0',
    cffi_modules=['native/vdsk_build.py:ffibuilder'],
    cmdclass={'build_py': BuildPyWithConlog},
)
