"""Build script: the metadata lives in setup.cfg; this only adds the native
code: libvdsk, which cffi compiles from native/, and the sandbox launcher
(native/sandbox, Linux only), compiled into nova_bhyve/sandbox/bin/ by the
build_py step below, whenever the package is installed. A launcher that
does not compile fails the install."""
import os
import shlex
import subprocess
import sys

import setuptools
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCHER_SRC = os.path.join('native', 'sandbox', 'launcher.c')
LAUNCHER_BIN = os.path.join('nova_bhyve', 'sandbox', 'bin',
                            'nova-bhyve-launcher')
# the same warnings as native/Makefile, without -Werror: a newer compiler's
# new warning must not break an operator's install (the tests build with
# -Werror)
LAUNCHER_CFLAGS = ['-O2', '-g', '-Wall', '-Wextra']


class BuildPyWithLauncher(build_py):
    """build_py, then the launcher binary into the built package."""

    def run(self):
        super().run()
        if not sys.platform.startswith('linux'):
            self.announce('nova-bhyve-launcher is Linux only (FreeBSD '
                          'VMs sandbox themselves with Capsicum): not '
                          'built', level=2)
            return
        out = os.path.join(self.build_lib, LAUNCHER_BIN)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        cc = shlex.split(os.environ.get('CC') or 'cc')
        cmd = cc + LAUNCHER_CFLAGS + [
            '-o', out, os.path.join(HERE, LAUNCHER_SRC)]
        self.announce('building the sandbox launcher: %s'
                      % ' '.join(cmd), level=2)
        try:
            subprocess.run(cmd, check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise SystemExit('nova-bhyve: the sandbox launcher (%s) did '
                             'not compile: %s' % (LAUNCHER_SRC, e))
        os.chmod(out, 0o755)

    def get_outputs(self, include_bytecode=1):
        outputs = super().get_outputs(include_bytecode)
        if sys.platform.startswith('linux'):
            outputs.append(os.path.join(self.build_lib, LAUNCHER_BIN))
        return outputs


setuptools.setup(
    version='0.1.0',
    cffi_modules=['native/vdsk_build.py:ffibuilder'],
    cmdclass={'build_py': BuildPyWithLauncher},
)
