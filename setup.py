"""Build script: the metadata lives in setup.cfg; this only adds the native
code: libvdsk, which cffi compiles from native/, and two small programs
compiled into the package by the build_py step below whenever it is
installed: the console logger (native/conlog ->
nova_bhyve/libexec/nova-bhyve-conlog) and the sandbox launcher
(native/sandbox, Linux only -> nova_bhyve/sandbox/bin/nova-bhyve-launcher).
A program that does not compile fails the install."""
import os
import shlex
import subprocess
import sys

import setuptools
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
# (source, installed path, Linux only)
PROGRAMS = [
    (os.path.join('native', 'conlog', 'conlog.c'),
     os.path.join('nova_bhyve', 'libexec', 'nova-bhyve-conlog'), False),
    (os.path.join('native', 'sandbox', 'launcher.c'),
     os.path.join('nova_bhyve', 'sandbox', 'bin', 'nova-bhyve-launcher'),
     True),
]
# the same warnings as native/Makefile, without -Werror: a newer compiler's
# new warning must not break an operator's install (the tests build with
# -Werror)
CFLAGS = ['-O2', '-g', '-Wall', '-Wextra']


def _programs():
    linux = sys.platform.startswith('linux')
    return [(src, out) for src, out, linux_only in PROGRAMS
            if linux or not linux_only]


class BuildPyWithPrograms(build_py):
    """build_py, then the native programs into the built package."""

    def run(self):
        super().run()
        if not sys.platform.startswith('linux'):
            self.announce('nova-bhyve-launcher is Linux only (FreeBSD '
                          'VMs sandbox themselves with Capsicum): not '
                          'built', level=2)
        cc = shlex.split(os.environ.get('CC') or 'cc')
        for src, rel in _programs():
            out = os.path.join(self.build_lib, rel)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            cmd = cc + CFLAGS + ['-o', out, os.path.join(HERE, src)]
            self.announce('building %s: %s' % (rel, ' '.join(cmd)), level=2)
            try:
                subprocess.run(cmd, check=True)
            except (OSError, subprocess.CalledProcessError) as e:
                raise SystemExit('nova-bhyve: %s did not compile: %s'
                                 % (src, e))
            os.chmod(out, 0o755)

    def get_outputs(self, include_bytecode=1):
        outputs = super().get_outputs(include_bytecode)
        outputs.extend(os.path.join(self.build_lib, rel)
                       for _, rel in _programs())
        return outputs


setuptools.setup(
    version='0.1.0',
    cffi_modules=['native/vdsk_build.py:ffibuilder'],
    cmdclass={'build_py': BuildPyWithPrograms},
)
