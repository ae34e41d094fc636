"""The cloud's daemons: started in sessions of their own, stopped by PID.

Each daemon runs in the foreground of its own session (so its process group
is its PID and holds its workers); its pid file records the PID and the
process's start time, so a reused PID is never signalled.
"""
import os
import signal
import subprocess
import time

from allinone import layout


class CloudError(Exception):
    """A step of the cloud failed; the message says which and where to
    look."""


def _start_time(pid):
    """The process's start time (clock ticks after boot); None once it has
    exited (a zombie included)."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            fields = f.read().rsplit(')', 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ('Z', 'X') else fields[19]


def _pidfile(name):
    return layout.run(name + '.pid')


def pid_of(name):
    """The daemon's PID if it is still the process we started, else None."""
    try:
        with open(_pidfile(name)) as f:
            pid, started = f.read().split()
    except (OSError, ValueError):
        return None
    pid = int(pid)
    return pid if _start_time(pid) == started else None


def names():
    """Every daemon with a pid file, in the order they were started."""
    run = layout.run('')
    if not os.path.isdir(run):
        return []
    files = [f for f in os.listdir(run) if f.endswith('.pid')]
    files.sort(key=lambda f: os.stat(os.path.join(run, f)).st_mtime_ns)
    return [f[:-len('.pid')] for f in files]


def start(name, argv, env=None, cwd=None):
    """Start ``argv`` as daemon ``name`` unless it already runs; its output
    goes to log/<name>.log."""
    pid = pid_of(name)
    if pid:
        return pid
    os.makedirs(os.path.dirname(layout.log(name)), exist_ok=True)
    os.makedirs(layout.run(''), exist_ok=True)
    with open(layout.log(name), 'ab') as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, **(env or {})), cwd=cwd or layout.BASE)
    with open(_pidfile(name), 'w') as f:
        f.write('%d %s\n' % (proc.pid, _start_time(proc.pid)))
    return proc.pid


def log_tail(name, lines=15):
    try:
        with open(layout.log(name), errors='replace') as f:
            return ''.join(f.readlines()[-lines:])
    except OSError:
        return ''


def wait_for(name, check, what, timeout=120):
    """Wait until ``check()`` is true; fail early if the daemon died."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if not pid_of(name):
            raise CloudError('%s exited before %s; %s ends with:\n%s' % (
                name, what, layout.log(name), log_tail(name)))
        if time.monotonic() > deadline:
            raise CloudError('%s: no %s after %d s; see %s' % (
                name, what, timeout, layout.log(name)))
        time.sleep(0.5)


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def stop(name, timeout=30):
    """SIGTERM the daemon's process group, SIGKILL what is left after
    ``timeout``; True if it was running."""
    pid = pid_of(name)
    if pid:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while _group_alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.2)
        if _group_alive(pid):
            os.killpg(pid, signal.SIGKILL)
            while _group_alive(pid):
                _reap(pid)
                time.sleep(0.1)
    try:
        os.unlink(_pidfile(name))
    except FileNotFoundError:
        pass
    return bool(pid)


def _reap(pid):
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def run(argv, what, env=None, input=None, timeout=600):
    """A one-shot command of the set-up; its output goes to log/setup.log
    and a failure quotes it."""
    proc = subprocess.run(argv, env=dict(os.environ, **(env or {})),
                          input=input, capture_output=True, text=True,
                          timeout=timeout, cwd=layout.BASE)
    os.makedirs(os.path.dirname(layout.log('setup')), exist_ok=True)
    with open(layout.log('setup'), 'a') as f:
        f.write('$ %s\n%s%s' % (' '.join(argv), proc.stdout, proc.stderr))
    if proc.returncode:
        raise CloudError('%s failed (%s, exit %d):\n%s' % (
            what, argv[0], proc.returncode,
            (proc.stderr or proc.stdout)[-2000:]))
    return proc.stdout
