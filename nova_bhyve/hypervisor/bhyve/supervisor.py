"""A tiny detached supervisor for one VM process.

Run as::

    python -m nova_bhyve.hypervisor.bhyve.supervisor --vmdir DIR
        [--policy bhyve] [--console-device PATH] [--console-keep-bytes N]
        [--daemonize]
        [--first-run-arg=ARG ...] -- ARGV...

``--first-run-arg`` arguments are appended to ARGV for the first start only
(bhyve's ``-r STATEFILE``: a VM resumed from a saved state boots normally
when the guest reboots later, and the state file is gone by then).

It outlives nova-compute (``spawn()`` starts it in a new session and it
forks once more, so it is re-parented to init and nova-compute never has to
reap it), and it is generic: it receives the VM argv and the name of an exit
policy, so any backend whose VM process signals reboot / power-off through its
exit status can reuse it.

Files it keeps in DIR (``base.VMDir`` names where one exists):

* ``supervisor.pid``   its own pid, while it runs;
* ``vm.pid``           the pid of the current VM process (rewritten on every
                       restart, removed when the supervisor ends);
* ``exit.status``      written once at the end, one JSON object:
                       ``{"status": 1, "outcome": "poweroff",
                       "action": "stop", "error": false, "restarts": 2}``;
* ``supervisor.log``   its own messages and the VM process' stdout/stderr;
* ``console.log``      what the guest wrote on its serial console, when
                       ``--console-device`` names a tty to read it from
                       (bhyve: the B side of the nmdm(4) pair whose A side is
                       the guest's COM1).

Signals: SIGUSR1 makes the next exit of the VM process final without
telling the VM anything (bhyve exits 0 after ``bhyvectl --suspend``, which
would otherwise be a reboot); SIGUSR2 cancels it. SIGTERM / SIGINT are
forwarded to the VM process (for bhyve that is the ACPI power button) and
mark the run as "stop requested", so a guest that reboots instead of
powering off is not started again. SIGHUP is ignored.
"""
import argparse
import collections
import json
import os
import select
import signal
import subprocess
import sys
import termios
import threading
import time
import tty

SUPERVISOR_PIDFILE = 'supervisor.pid'
VM_PIDFILE = 'vm.pid'
EXIT_STATUS = 'exit.status'
LOGFILE = 'supervisor.log'
CONSOLE_LOG = 'console.log'

RESTART = 'restart'
STOP = 'stop'
ERROR = 'error'

Decision = collections.namedtuple('Decision', 'action outcome')

# bhyve(8) EXIT STATUS, checked against usr.sbin/bhyve/bhyve.8 and
# amd64/vmexit.c:vmexit_suspend (VM_SUSPEND_RESET -> 0, POWEROFF -> 1,
# HALT -> 2, TRIPLEFAULT -> 3); setup and device errors exit 4 (errx(4, ..),
# exit(4)), usage errors EX_USAGE (64), sandbox errors EX_OSERR (71) and an
# unknown suspend reason 100: all of those are errors.
BHYVE_EXIT_CODES = {
    0: Decision(RESTART, 'reboot'),
    1: Decision(STOP, 'poweroff'),
    2: Decision(STOP, 'halt'),
    3: Decision(ERROR, 'triple fault'),
    4: Decision(ERROR, 'error'),
}

POLICIES = ('bhyve', 'oneshot')

#: restart-loop guard: more than this many restarts ...
MAX_RESTARTS = 10
#: ... within this many seconds is an error, not a reboot.
RESTART_WINDOW = 60.0


def decide(policy, returncode, stop_requested=False):
    """What to do after the VM process ended with ``returncode``.

    ``returncode`` is a subprocess return code (negative: killed by that
    signal). Pure; the whole restart policy of the supervisor is here.

    * ``bhyve``: bhyve(8) exit statuses (0 reboot -> restart, 1 poweroff and
      2 halt -> stop, 3 triple fault and 4 error -> error, anything else ->
      error).
    * ``oneshot``: a process that exits once (e.g. QEMU with -no-reboot):
      0 -> stop, anything else -> error.

    With ``stop_requested`` (a SIGTERM was forwarded), a restart becomes a
    stop, and death by SIGTERM is a normal stop.
    """
    if policy not in POLICIES:
        raise ValueError('unknown exit policy %r (known: %s)'
                         % (policy, ', '.join(POLICIES)))
    if returncode < 0:
        signum = -returncode
        if stop_requested and signum in (signal.SIGTERM, signal.SIGINT):
            return Decision(STOP, 'terminated')
        return Decision(ERROR, 'killed by signal %d' % signum)
    if policy == 'bhyve':
        decision = BHYVE_EXIT_CODES.get(
            returncode, Decision(ERROR, 'exit status %d' % returncode))
    else:
        decision = (Decision(STOP, 'exited') if returncode == 0 else
                    Decision(ERROR, 'exit status %d' % returncode))
    if decision.action == RESTART and stop_requested:
        return Decision(STOP, decision.outcome)
    return decision


def restart_allowed(restart_times, now, max_restarts=MAX_RESTARTS,
                    window=RESTART_WINDOW):
    """False when ``restart_times`` (monotonic seconds) already holds
    ``max_restarts`` restarts within ``window`` seconds before ``now``."""
    recent = [t for t in restart_times if now - t < window]
    return len(recent) < max_restarts


# -- files --------------------------------------------------------------

def _atomic_write(path, text):
    tmp = '%s.tmp.%d' % (path, os.getpid())
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, path)


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def read_pidfile(path):
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def write_exit_status(vmdir, status, outcome, action, restarts=0):
    record = {'status': status, 'outcome': outcome, 'action': action,
              'error': action == ERROR, 'restarts': restarts,
              'time': time.time()}
    _atomic_write(os.path.join(vmdir, EXIT_STATUS),
                  json.dumps(record, sort_keys=True) + '\n')
    return record


def read_exit_status(vmdir):
    """The record ``write_exit_status`` wrote, or None."""
    try:
        with open(os.path.join(vmdir, EXIT_STATUS)) as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


# -- console ------------------------------------------------------------

def _set_raw(fd):
    """Raw mode without echo: the reader side of a tty pair must never
    echo the guest's output back to it as input."""
    try:
        tty.setraw(fd)
        attrs = termios.tcgetattr(fd)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
    except Exception:   # not a tty (a FIFO, a file): nothing to do
        pass


class ConsoleReader(threading.Thread):
    """Copy what appears on ``device`` to ``logpath``.

    The device is (re)opened whenever it is missing or its other side went
    away (bhyve closes the nmdm A side when it exits for a reboot).
    ``rotate()`` asks for the log to be moved to ``<log>.0`` if it is larger
    than ``keep_bytes``; the supervisor asks for it before each VM start.
    """

    def __init__(self, device, logpath, keep_bytes=None, poll=0.2):
        super().__init__(name='console-reader', daemon=True)
        self.device = device
        self.logpath = logpath
        self.keep_bytes = keep_bytes
        self.poll = poll
        self._stopping = threading.Event()
        self._rotate = threading.Event()
        self._log = None

    def stop(self, timeout=2.0):
        self._stopping.set()
        self.join(timeout)

    def rotate(self):
        self._rotate.set()

    def _maybe_rotate(self):
        self._rotate.clear()
        if not self.keep_bytes:
            return
        try:
            size = os.path.getsize(self.logpath)
        except OSError:
            return
        if size > self.keep_bytes:
            if self._log is not None:
                self._log.close()
                self._log = None
            os.replace(self.logpath, self.logpath + '.0')

    def _write(self, data):
        if self._log is None:
            self._log = open(self.logpath, 'ab', buffering=0)
        self._log.write(data)

    def run(self):
        fd = None
        try:
            while True:
                stopping = self._stopping.is_set()
                if self._rotate.is_set():
                    self._maybe_rotate()
                if fd is None:
                    if stopping:
                        return
                    try:
                        fd = os.open(self.device, os.O_RDONLY |
                                     os.O_NOCTTY | os.O_NONBLOCK)
                    except OSError:
                        self._stopping.wait(self.poll)
                        continue
                    _set_raw(fd)
                ready, _, _ = select.select([fd], [], [],
                                            0 if stopping else self.poll)
                if not ready:
                    if stopping:
                        return
                    continue
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                except OSError:        # EIO: the other side is gone
                    data = b''
                if data:
                    self._write(data)
                    continue
                os.close(fd)
                fd = None
                if stopping:
                    return
                self._stopping.wait(self.poll)
        finally:
            if fd is not None:
                os.close(fd)
            if self._log is not None:
                self._log.close()


# -- the supervisor -------------------------------------------------------

def _log(msg):
    sys.stderr.write('%s supervisor[%d]: %s\n' % (
        time.strftime('%Y-%m-%d %H:%M:%S'), os.getpid(), msg))
    sys.stderr.flush()


class Supervisor:

    def __init__(self, vmdir, argv, policy='bhyve', console_device=None,
                 console_keep_bytes=None, max_restarts=MAX_RESTARTS,
                 restart_window=RESTART_WINDOW, first_run_args=()):
        decide(policy, 0)          # validates the policy name
        self.vmdir = vmdir
        self.argv = list(argv)
        self.first_run_args = list(first_run_args)
        self.policy = policy
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.child = None
        self.stop_requested = False
        self.console = None
        if console_device:
            self.console = ConsoleReader(
                console_device, os.path.join(vmdir, CONSOLE_LOG),
                console_keep_bytes)

    def _path(self, name):
        return os.path.join(self.vmdir, name)

    def _on_stop_signal(self, signum, frame):
        self.stop_requested = True
        self._forward(signum)

    def _on_hold_signal(self, signum, frame):
        """SIGUSR1: the VM process' next exit is final (it is about to be
        suspended to a file and exit); SIGUSR2 cancels that."""
        self.stop_requested = signum == signal.SIGUSR1
        _log('hold %s' % ('set' if self.stop_requested else 'released'))

    def _forward(self, signum):
        child = self.child
        if child is not None and child.returncode is None:
            try:
                os.kill(child.pid, signum)
                _log('forwarded signal %d to pid %d' % (signum, child.pid))
            except ProcessLookupError:
                pass

    def run(self):
        _atomic_write(self._path(SUPERVISOR_PIDFILE), '%d\n' % os.getpid())
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, self._on_hold_signal)
        signal.signal(signal.SIGUSR2, self._on_hold_signal)
        if self.console is not None:
            self.console.start()
        restarts = 0
        restart_times = []
        status, decision = None, Decision(STOP, 'stop requested')
        try:
            while not self.stop_requested:
                if self.console is not None:
                    self.console.rotate()
                argv = self.argv if restarts or not self.first_run_args \
                    else self.argv + self.first_run_args
                _log('starting: %s' % ' '.join(argv))
                try:
                    self.child = subprocess.Popen(
                        argv, stdin=subprocess.DEVNULL, close_fds=True)
                except OSError as e:
                    _log('cannot start %s: %s' % (self.argv[0], e))
                    status, decision = None, Decision(
                        ERROR, 'cannot execute: %s' % e)
                    break
                _atomic_write(self._path(VM_PIDFILE), '%d\n' % self.child.pid)
                if self.stop_requested:    # signal raced with the start
                    self._forward(signal.SIGTERM)
                status = self.child.wait()
                decision = decide(self.policy, status, self.stop_requested)
                _log('pid %d exited with %d: %s -> %s' % (
                    self.child.pid, status, decision.outcome,
                    decision.action))
                if decision.action != RESTART:
                    break
                now = time.monotonic()
                if not restart_allowed(restart_times, now, self.max_restarts,
                                       self.restart_window):
                    decision = Decision(ERROR, 'restart loop: %d restarts in '
                                        '%.0f s' % (self.max_restarts,
                                                    self.restart_window))
                    break
                restart_times.append(now)
                restarts += 1
            record = write_exit_status(self.vmdir, status, decision.outcome,
                                       decision.action, restarts)
            _log('final: %s' % json.dumps(record, sort_keys=True))
        finally:
            _unlink(self._path(VM_PIDFILE))
            if self.console is not None:
                self.console.stop()
            _unlink(self._path(SUPERVISOR_PIDFILE))
        return 0 if decision.action != ERROR else 1


def _daemonize(vmdir):
    """Second fork: the intermediate exits, the child is re-parented."""
    if os.fork() > 0:
        os._exit(0)
    try:
        os.setsid()
    except OSError:
        pass      # already a session leader (not after a fork; harmless)
    os.chdir('/')
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    log = os.open(os.path.join(vmdir, LOGFILE),
                  os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)


def spawn(vmdir, argv, policy='bhyve', console_device=None,
          console_keep_bytes=None, timeout=10.0, python=None,
          first_run_args=()):
    """Start a detached supervisor running ``argv``; return its pid (None
    when the supervisor already ended: read ``read_exit_status``).

    Returns once the supervisor wrote its pid file and either the VM pid
    file or (the VM already ended) the exit status. Raises RuntimeError if
    neither appears within ``timeout`` seconds.
    """
    vmdir = os.path.abspath(vmdir)
    for name in (EXIT_STATUS, VM_PIDFILE, SUPERVISOR_PIDFILE):
        _unlink(os.path.join(vmdir, name))
    cmd = [python or sys.executable, '-m',
           'nova_bhyve.hypervisor.bhyve.supervisor',
           '--vmdir', vmdir, '--policy', policy, '--daemonize']
    if console_device:
        cmd += ['--console-device', console_device]
    if console_keep_bytes:
        cmd += ['--console-keep-bytes', str(int(console_keep_bytes))]
    # --opt=VALUE: a value such as '-r' would be taken for an option
    cmd += ['--first-run-arg=%s' % a for a in first_run_args]
    cmd += ['--'] + list(argv)
    env = dict(os.environ)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (pkg_parent, env.get('PYTHONPATH')) if p)
    with open(os.path.join(vmdir, LOGFILE), 'ab') as log:
        intermediate = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            close_fds=True, start_new_session=True, cwd='/', env=env)
    rc = intermediate.wait(timeout)
    if rc != 0:
        raise RuntimeError('supervisor for %s failed to start (status %d), '
                           'see %s' % (vmdir, rc,
                                       os.path.join(vmdir, LOGFILE)))
    deadline = time.monotonic() + timeout
    sup_pidfile = os.path.join(vmdir, SUPERVISOR_PIDFILE)
    while time.monotonic() < deadline:
        sup = read_pidfile(sup_pidfile)
        if os.path.exists(os.path.join(vmdir, EXIT_STATUS)):
            return sup
        if sup and read_pidfile(os.path.join(vmdir, VM_PIDFILE)):
            return sup
        time.sleep(0.02)
    raise RuntimeError('supervisor for %s did not start its VM within '
                       '%.0f s, see %s' % (vmdir, timeout,
                                           os.path.join(vmdir, LOGFILE)))


def main(args=None):
    parser = argparse.ArgumentParser(
        prog='python -m nova_bhyve.hypervisor.bhyve.supervisor',
        description='Run a VM process, restart it on guest reboot, record '
                    'how it ended.')
    parser.add_argument('--vmdir', required=True)
    parser.add_argument('--policy', default='bhyve', choices=POLICIES)
    parser.add_argument('--console-device')
    parser.add_argument('--console-keep-bytes', type=int)
    parser.add_argument('--daemonize', action='store_true')
    parser.add_argument('--first-run-arg', action='append', default=[],
                        dest='first_run_args')
    parser.add_argument('argv', nargs=argparse.REMAINDER)
    opts = parser.parse_args(args)
    argv = opts.argv[1:] if opts.argv[:1] == ['--'] else opts.argv
    if not argv:
        parser.error('no VM command given after --')
    vmdir = os.path.abspath(opts.vmdir)
    if opts.daemonize:
        _daemonize(vmdir)
    return Supervisor(vmdir, argv, opts.policy, opts.console_device,
                      opts.console_keep_bytes,
                      first_run_args=opts.first_run_args).run()


if __name__ == '__main__':
    sys.exit(main())
