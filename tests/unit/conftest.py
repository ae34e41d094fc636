"""Fixtures shared by the unit tests that need real child processes."""
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

import pytest

from nova_bhyve import conf


@pytest.fixture(autouse=True)
def runtime_path():
    """[bhyve] runtime_path: a fresh short directory per test (the VMs'
    monitor sockets go there, not under /run)."""
    path = tempfile.mkdtemp(prefix='nbrt-')
    conf.CONF.set_override('runtime_path', path, group='bhyve')
    yield path
    conf.CONF.clear_override('runtime_path', group='bhyve')
    shutil.rmtree(path, ignore_errors=True)


def wait_exec(pid, marker, timeout=10):
    """Wait until ``pid`` runs its new program: Popen returns when the exec
    has started, but for a moment /proc/PID/cmdline is still empty."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open('/proc/%d/cmdline' % pid, 'rb') as f:
                if marker.encode() in f.read():
                    return
        except OSError:
            return                  # already gone
        assert time.monotonic() < deadline, 'exec of %d never seen' % pid
        time.sleep(0.001)


@pytest.fixture
def spawn_marked():
    """Start a real `sleep` whose command line carries a marker (argv[0]),
    as a VM process's carries its instance uuid (QEMU: -uuid). With
    ``reap`` a thread reaps it, as init reaps a daemonized VM. Everything
    started is killed by PID at the end."""
    started = []

    def start(marker, seconds=60, reap=True):
        proc = subprocess.Popen(['sleep-%s' % marker, str(seconds)],
                                executable='/bin/sleep')
        wait_exec(proc.pid, marker)
        reaper = None
        if reap:
            reaper = threading.Thread(target=proc.wait, daemon=True)
            reaper.start()
        started.append((proc, reaper))
        return proc
    yield start
    for proc, reaper in started:
        if proc.returncode is None:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if reaper is not None:
            reaper.join(10)
        else:
            proc.wait(10)
