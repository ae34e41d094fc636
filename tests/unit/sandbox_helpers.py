"""Shared by the sandbox tests: the launcher binary to test, world-readable
scratch directories (pytest's tmp_path is 0700 under /tmp/pytest-of-root:
a sandboxed uid could not reach it), uids from a private allocator, and
killing by pid what a test started."""
import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from nova_bhyve.sandbox import features
from nova_bhyve.sandbox import launcher
from nova_bhyve.sandbox import uids

NATIVE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'native')
# what a dynamically linked program (and python3) needs to start
SYSTEM_RX = [p for p in ('/usr', '/lib', '/lib64', '/bin', '/sbin')
             if os.path.exists(p)]
PYTHON = os.path.realpath('/usr/bin/python3')


def needs_root_and_landlock(min_abi=1):
    return [
        pytest.mark.skipif(os.geteuid() != 0,
                           reason='the launcher changes uid: needs root'),
        pytest.mark.skipif(features.landlock_abi() < min_abi,
                           reason='needs Landlock ABI >= %d (kernel has %d)'
                           % (min_abi, features.landlock_abi())),
    ]


def built_launcher(target='launcher', name='nova-bhyve-launcher'):
    """native/_build/[asan/]nova-bhyve-launcher, made with -Werror."""
    p = subprocess.run(['make', '-C', NATIVE, target], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    path = os.path.join(NATIVE, '_build',
                        *(['asan'] if target.endswith('asan') else []), name)
    assert os.access(path, os.X_OK), path
    return path


def launcher_binary():
    """The installed launcher, or (a source-tree run) a fresh build."""
    try:
        return launcher.binary()
    except launcher.LauncherNotFound:
        return built_launcher()


def scratch_dir():
    d = tempfile.mkdtemp(prefix='nova-bhyve-sandbox-test-', dir='/tmp')
    os.chmod(d, 0o755)
    return d


def remove_dir(d):
    shutil.rmtree(d, ignore_errors=True)


class Uids(object):
    """Uids for the test, from a private state directory; all released."""

    def __init__(self):
        self.state = tempfile.mkdtemp(prefix='nova-bhyve-uids-')
        self.alloc = uids.UidAllocator(self.state, '64900-64999')
        self.owners = []

    def get(self):
        owner = 'test-%d-%d' % (os.getpid(), len(self.owners))
        self.owners.append(owner)
        return self.alloc.allocate(owner)

    def release_all(self):
        for owner in self.owners:
            self.alloc.release(owner)
        assert self.alloc.allocated() == {}
        shutil.rmtree(self.state)


def kill_pid(pid, timeout=10):
    """SIGKILL ``pid`` and wait until it is gone (reaped by whoever is its
    parent) or a zombie."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open('/proc/%d/stat' % pid) as f:
                if f.read().rsplit(')', 1)[1].split()[0] == 'Z':
                    return
        except FileNotFoundError:
            return
        time.sleep(0.01)
    raise AssertionError('pid %d did not die' % pid)


def proc_status(pid):
    fields = {}
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            key, _, value = line.partition(':')
            fields[key] = value.strip()
    return fields
