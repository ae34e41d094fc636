"""nova-bhyve-launcher, run for real: a program started under it has its
own uid and gid, no groups, no capabilities, no_new_privs; it cannot open,
bind, connect or signal what its rules do not allow (each denial asserted
by the errno the program gets); a failing step ends the launch before the
program runs, names the step and exits with that step's status.

Every process started is killed by pid, every scratch directory and uid
allocation removed."""
import errno
import json
import os
import re
import signal
import socket
import subprocess
import textwrap
import time

import pytest

from nova_bhyve.sandbox import features
from nova_bhyve.sandbox import launcher
from nova_bhyve.sandbox import spawn

from sandbox_helpers import kill_pid
from sandbox_helpers import launcher_binary
from sandbox_helpers import NATIVE
from sandbox_helpers import needs_root_and_landlock
from sandbox_helpers import proc_status
from sandbox_helpers import PYTHON
from sandbox_helpers import remove_dir
from sandbox_helpers import scratch_dir
from sandbox_helpers import SYSTEM_RX
from sandbox_helpers import Uids

pytestmark = needs_root_and_landlock()


@pytest.fixture(scope='module')
def binary():
    return launcher_binary()


@pytest.fixture
def ids():
    u = Uids()
    yield u
    u.release_all()


@pytest.fixture
def scratch():
    d = scratch_dir()
    yield d
    remove_dir(d)


@pytest.fixture
def pids():
    """Pids to kill at the end."""
    started = []
    yield started
    for pid in started:
        kill_pid(pid)


def _spec(uid, program, **kw):
    kw.setdefault('rx', SYSTEM_RX)
    return launcher.Spec(uid=uid, gid=uid, program=program, **kw)


def _wait_exec(pid, exe, timeout=10):
    deadline = time.monotonic() + timeout
    while os.path.realpath('/proc/%d/exe' % pid) != exe:
        assert time.monotonic() < deadline, 'pid %d never exec\'d' % pid
        time.sleep(0.005)


# -- the exit statuses: one table, two languages ----------------------------

def test_python_exit_statuses_match_launcher_h():
    with open(os.path.join(NATIVE, 'sandbox', 'launcher.h')) as f:
        defined = dict((name.lower(), int(value)) for name, value in
                       re.findall(r'#define NBL_EXIT_(\w+)\s+(\d+)',
                                  f.read()))
    assert defined == dict(launcher.STEPS)
    assert len(set(defined.values())) == len(defined)


# -- credentials, capabilities, no_new_privs --------------------------------

def test_program_has_its_uid_no_groups_no_caps_nnp(binary, ids, pids):
    seen = []
    for _ in range(2):
        uid = ids.get()
        got = spawn.start(_spec(uid, ['/bin/sleep', '60'],
                                unshare=('ipc', 'uts', 'mount')),
                          launcher_path=binary)
        pids.append(got.pid)
        _wait_exec(got.pid, os.path.realpath('/bin/sleep'))
        st = proc_status(got.pid)
        assert st['Uid'].split() == [str(uid)] * 4
        assert st['Gid'].split() == [str(uid)] * 4
        assert st['Groups'] == ''
        for cap in ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb'):
            assert int(st[cap], 16) == 0, (cap, st[cap])
        assert st['NoNewPrivs'] == '1'
        # its own IPC, UTS and mount namespaces
        for ns in ('ipc', 'uts', 'mnt'):
            assert os.readlink('/proc/%d/ns/%s' % (got.pid, ns)) != \
                os.readlink('/proc/self/ns/%s' % ns), ns
        seen.append(uid)
        kill_pid(got.pid)
        got.proc.wait()
    assert seen[0] != seen[1]


def test_daemonized_program_reports_its_pid(binary, ids, pids):
    uid = ids.get()
    got = spawn.start(_spec(uid, ['/bin/sleep', '60'], daemonize=True,
                            pid_fd=0), launcher_path=binary)
    pids.append(got.pid)
    assert got.proc is None
    _wait_exec(got.pid, os.path.realpath('/bin/sleep'))
    st = proc_status(got.pid)
    assert st['Uid'].split() == [str(uid)] * 4
    # not our child any more, in a session of its own, not its leader
    assert int(st['PPid']) != os.getpid()
    assert os.getsid(got.pid) != os.getsid(0)
    assert os.getsid(got.pid) != got.pid


def test_only_kept_descriptors_survive(binary, ids, scratch):
    uid = ids.get()
    keep_r, keep_w = os.pipe()
    drop_r, drop_w = os.pipe()
    probe = textwrap.dedent('''
        import os
        def is_open(fd):
            try:
                os.fstat(fd)
                return True
            except OSError:
                return False
        print([fd for fd in range(3, 1024) if is_open(fd)])
    ''')
    try:
        spec = _spec(uid, [PYTHON, '-I', '-S', '-B', '-c', probe],
                     keep_fds=[keep_w])
        proc = subprocess.Popen(launcher.argv(spec, binary),
                                pass_fds=[keep_w, drop_w],
                                stdout=subprocess.PIPE, text=True,
                                env=spawn.MINIMAL_ENV)
        out, _ = proc.communicate(timeout=60)
    finally:
        for fd in (keep_r, keep_w, drop_r, drop_w):
            os.close(fd)
    assert proc.returncode == 0
    assert json.loads(out) == [keep_w]


# -- what the program must not do -------------------------------------------

PROBE = textwrap.dedent('''
    import errno, json, os, signal, socket, sys
    args = json.loads(sys.argv[1])
    result = {}

    def attempt(name, fn):
        try:
            fn()
            result[name] = 0
        except OSError as e:
            result[name] = e.errno

    def read(path):
        with open(path) as f:
            f.read()

    def write(path, mode):
        with open(path, mode) as f:
            f.write('x')

    def bind(port):
        s = socket.socket()
        try:
            s.bind(('127.0.0.1', port))
        finally:
            s.close()

    def connect(port):
        s = socket.socket()
        try:
            s.connect(('127.0.0.1', port))
        finally:
            s.close()

    def abstract(name):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(b'\\0' + name.encode())
        finally:
            s.close()

    def kill_own_child():
        pid = os.fork()
        if pid == 0:
            signal.pause()
            os._exit(0)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)

    attempt('read_allowed', lambda: read(args['ro_file']))
    attempt('read_outside', lambda: read(args['outside_file']))
    attempt('read_passwd', lambda: read('/etc/passwd'))
    attempt('create_in_ro', lambda: write(args['ro_dir'] + '/new', 'w'))
    attempt('append_in_ro', lambda: write(args['ro_file'], 'a'))
    attempt('write_rw', lambda: write(args['rw_file'], 'a'))
    attempt('create_in_rw', lambda: write(args['rw_dir'] + '/new', 'w'))
    attempt('bind_allowed', lambda: bind(args['bind_ok']))
    attempt('bind_other', lambda: bind(args['bind_other']))
    attempt('connect_allowed', lambda: connect(args['connect_ok']))
    attempt('connect_other', lambda: connect(args['connect_other']))
    attempt('signal_outside', lambda: os.kill(args['outside_pid'],
                                              signal.SIGTERM))
    attempt('signal_own_child', kill_own_child)
    attempt('abstract_unix_outside', lambda: abstract(args['abstract']))
    print(json.dumps(result))
''')


def _free_port():
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _listener():
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    s.listen(4)
    return s


@pytest.mark.skipif(features.landlock_abi() < 6,
                    reason='TCP rules need Landlock ABI 4, signal and '
                           'abstract socket scoping ABI 6')
def test_program_cannot_reach_what_its_rules_do_not_allow(
        binary, ids, scratch, pids):
    uid = ids.get()
    ro_dir = os.path.join(scratch, 'ro')
    rw_dir = os.path.join(scratch, 'rw')
    outside = os.path.join(scratch, 'outside')
    for d in (ro_dir, rw_dir, outside):
        os.mkdir(d)
        os.chmod(d, 0o777)          # DAC would allow everything below
    files = {}
    for name, d in (('ro_file', ro_dir), ('rw_file', rw_dir),
                    ('outside_file', outside)):
        files[name] = os.path.join(d, 'file')
        with open(files[name], 'w') as f:
            f.write('hello\n')
        os.chmod(files[name], 0o666)
    # a process of the same uid, outside the sandbox's Landlock domain:
    # only Landlock's scoping can refuse the signal
    target = subprocess.Popen(['/bin/sleep', '60'], user=uid, group=uid,
                              extra_groups=[])
    pids.append(target.pid)
    allowed, other = _listener(), _listener()
    abstract_name = 'nova-bhyve-test-%d' % os.getpid()
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(b'\0' + abstract_name.encode())
    unix.listen(1)
    bind_ok, bind_other = _free_port(), _free_port()
    args = dict(files, ro_dir=ro_dir, rw_dir=rw_dir,
                bind_ok=bind_ok, bind_other=bind_other,
                connect_ok=allowed.getsockname()[1],
                connect_other=other.getsockname()[1],
                outside_pid=target.pid, abstract=abstract_name)
    try:
        got = spawn.start(
            _spec(uid, [PYTHON, '-I', '-S', '-B', '-c', PROBE,
                        json.dumps(args)],
                  ro=[ro_dir], rw=[rw_dir], bind_ports=[bind_ok],
                  connect_ports=[args['connect_ok']]),
            launcher_path=binary, stdout=subprocess.PIPE)
        out, _ = got.proc.communicate(timeout=60)
    finally:
        for s in (allowed, other, unix):
            s.close()
    assert got.proc.returncode == 0
    result = json.loads(out)
    assert result == {
        'read_allowed': 0,
        'read_outside': errno.EACCES,
        'read_passwd': errno.EACCES,
        'create_in_ro': errno.EACCES,
        'append_in_ro': errno.EACCES,
        'write_rw': 0,
        'create_in_rw': errno.EACCES,   # --rw: existing files only
        'bind_allowed': 0,
        'bind_other': errno.EACCES,
        'connect_allowed': 0,
        'connect_other': errno.EACCES,
        'signal_outside': errno.EPERM,
        'signal_own_child': 0,
        'abstract_unix_outside': errno.EPERM,
    }
    assert target.poll() is None, 'the outside process got the signal'
    with open(files['rw_file']) as f:
        assert f.read() == 'hello\nx'


# -- failing steps: the program never runs ----------------------------------

@pytest.fixture
def marker(scratch):
    """A file the program writes "ran" into (an existing file under --rw:
    Landlock allows that, and nothing else), empty until then."""
    path = os.path.join(scratch, 'marker')
    open(path, 'w').close()
    os.chmod(path, 0o666)
    return path


def _marker_program(path):
    return ['/bin/sh', '-c', 'echo ran > %s' % path]


def _read(path):
    with open(path) as f:
        return f.read()


def test_marker_program_runs_when_nothing_fails(binary, ids, marker):
    got = spawn.start(_spec(ids.get(), _marker_program(marker),
                            rw=[marker]), launcher_path=binary)
    assert got.proc.wait(timeout=30) == 0
    assert _read(marker) == 'ran\n'


@pytest.mark.parametrize('case', ['uid0', 'gid0', 'no_cgroup', 'no_ro_path',
                                  'no_ro_path_daemonized', 'bad_exec'])
def test_failing_step_stops_the_launch(binary, ids, marker, scratch, case,
                                       capfd):
    uid = ids.get()
    kw = dict(rw=[marker])
    step = {'uid0': 'credentials', 'gid0': 'credentials',
            'no_cgroup': 'cgroup', 'no_ro_path': 'landlock',
            'no_ro_path_daemonized': 'landlock', 'bad_exec': 'exec'}[case]
    program = _marker_program(marker)
    if case == 'no_cgroup':
        kw['cgroups'] = [os.path.join(scratch, 'no-such-cgroup')]
    elif case.startswith('no_ro_path'):
        kw['ro'] = [os.path.join(scratch, 'no-such-dir')]
        if case.endswith('daemonized'):
            kw.update(daemonize=True, pid_fd=0)
    elif case == 'bad_exec':
        program = [os.path.join(scratch, 'no-such-program')]
    spec = _spec(uid, program, **kw)
    if case in ('uid0', 'gid0'):
        # launcher.argv refuses it too: bypass it to ask the launcher
        argv = launcher.argv(spec, binary)
        argv[argv.index('--uid' if case == 'uid0' else '--gid') + 1] = '0'
        status_r, status_w = os.pipe()
        argv[1:1] = ['--status-fd', str(status_w)]
        proc = subprocess.run(argv, pass_fds=[status_w],
                              capture_output=True, text=True, timeout=30)
        os.close(status_w)
        with os.fdopen(status_r) as f:
            status = launcher.parse_status(f.read())
        assert proc.returncode == dict(launcher.STEPS)[step]
        assert status.step == step and 'refused' in status.reason
        assert proc.stderr.startswith(
            'nova-bhyve-launcher: error %s: ' % step)
        assert len(proc.stderr.splitlines()) == 1
    else:
        with pytest.raises(spawn.LaunchFailed) as e:
            spawn.start(spec, launcher_path=binary)
        assert e.value.step == step
        assert e.value.returncode == dict(launcher.STEPS)[step]
        err = capfd.readouterr().err
        assert 'nova-bhyve-launcher: error %s: ' % step in err, err
    time.sleep(0.2)
    assert _read(marker) == '', 'the program ran'


def test_usage_errors(binary):
    for argv in ([], ['--uid', '5'], ['--uid', 'x', '--gid', '5', '--',
                                      '/bin/true'],
                 ['--uid', '5', '--gid', '5', '--', 'true'],
                 ['--uid', '5', '--gid', '5', '--unshare', 'net', '--',
                  '/bin/true'],
                 ['--uid', '5', '--gid', '5', '--daemonize', '--',
                  '/bin/true']):
        p = subprocess.run([binary] + argv, capture_output=True, text=True,
                           timeout=30)
        assert p.returncode == 2, (argv, p.stderr)
        assert p.stderr.startswith('nova-bhyve-launcher: error usage: '), \
            p.stderr


def test_no_signal_leaks_to_the_test(binary, ids):
    """SIGTERM to the sandboxed program ends it (the launcher leaves no
    blocked signal mask behind)."""
    got = spawn.start(_spec(ids.get(), ['/bin/sleep', '60']),
                      launcher_path=binary)
    _wait_exec(got.pid, os.path.realpath('/bin/sleep'))
    os.kill(got.pid, signal.SIGTERM)
    assert got.proc.wait(timeout=10) == -signal.SIGTERM


def test_ro_fd_lets_the_program_read_that_file_and_no_other(
        binary, ids, scratch):
    """--ro-fd N: the file of an inherited descriptor is readable through
    /proc/self/fd/N although the program's uid cannot reach its directory
    (mode 0700, root's), the descriptor stays open, and its neighbour in
    the same directory is not readable by any route."""
    uid = ids.get()
    hidden = os.path.join(scratch, 'hidden')
    os.mkdir(hidden, 0o700)
    kernel = os.path.join(hidden, 'vmlinuz')
    other = os.path.join(hidden, 'other')
    for path in (kernel, other):
        with open(path, 'w') as f:
            f.write(os.path.basename(path) + '\n')
        os.chmod(path, 0o644)
    probe = textwrap.dedent('''
        import json, sys
        fd, kernel, other = int(sys.argv[1]), sys.argv[2], sys.argv[3]
        def read(path):
            try:
                with open(path) as f:
                    return f.read().strip()
            except OSError as e:
                return e.errno
        print(json.dumps({'by_fd': read('/proc/self/fd/%d' % fd),
                          'by_path': read(kernel),
                          'neighbour': read(other)}))
    ''')
    fd = os.open(kernel, os.O_RDONLY)
    try:
        got = spawn.start(
            _spec(uid, [PYTHON, '-I', '-S', '-B', '-c', probe, str(fd),
                        kernel, other], ro_fds=[fd]),
            launcher_path=binary, stdout=subprocess.PIPE)
        out, _ = got.proc.communicate(timeout=60)
    finally:
        os.close(fd)
    assert got.proc.returncode == 0
    assert json.loads(out) == {'by_fd': 'vmlinuz', 'by_path': errno.EACCES,
                               'neighbour': errno.EACCES}


def test_ro_fd_not_open_in_the_launcher_fails_the_landlock_step(binary,
                                                                ids):
    uid = ids.get()
    spec = _spec(uid, ['/bin/true'], ro_fds=[987])
    proc = subprocess.run(launcher.argv(spec, binary), capture_output=True,
                          text=True, env=spawn.MINIMAL_ENV, timeout=60)
    assert proc.returncode == dict(launcher.STEPS)['landlock']
    assert 'error landlock: --ro-fd 987: Bad file descriptor' in proc.stderr
