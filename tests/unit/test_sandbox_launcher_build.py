"""The launcher's build and its command line: warning-free with -Wall
-Wextra -Werror, and its ASan+UBSan build through a successful launch and
each kind of failing step with no sanitizer report; launcher.argv and the
status protocol (pure)."""
import os
import shutil
import subprocess

import pytest

from nova_bhyve.sandbox import launcher
from nova_bhyve.sandbox import spawn

from sandbox_helpers import built_launcher
from sandbox_helpers import kill_pid
from sandbox_helpers import NATIVE
from sandbox_helpers import needs_root_and_landlock
from sandbox_helpers import remove_dir
from sandbox_helpers import scratch_dir
from sandbox_helpers import SYSTEM_RX
from sandbox_helpers import Uids

SAN_MARKERS = ('AddressSanitizer', 'LeakSanitizer', 'runtime error:',
               'UndefinedBehaviorSanitizer', 'SUMMARY:')
needs_cc = pytest.mark.skipif(
    shutil.which('make') is None or shutil.which('gcc') is None,
    reason='needs make and gcc')
ROOT_AND_LANDLOCK = needs_root_and_landlock()


# -- pure -------------------------------------------------------------------

def test_argv_has_every_option_in_order():
    spec = launcher.Spec(uid=64001, gid=64002, program=['/usr/bin/qemu',
                                                        '-S'],
                         cgroups=['/cg/a', '/cg/b'], keep_fds=[5, 6],
                         ro=['/r'], rx=['/x'], rw=['/w'], bind_ports=[0],
                         connect_ports=[4444], unshare=['ipc', 'mount'],
                         status_fd=9, daemonize=True, pid_fd=10)
    assert launcher.argv(spec, '/l') == [
        '/l', '--uid', '64001', '--gid', '64002',
        '--cgroup', '/cg/a', '--cgroup', '/cg/b',
        '--keep-fd', '5', '--keep-fd', '6', '--ro', '/r', '--rx', '/x',
        '--rw', '/w', '--bind-port', '0', '--connect-port', '4444',
        '--unshare', 'ipc,mount', '--status-fd', '9',
        '--daemonize', '--pid-fd', '10', '--', '/usr/bin/qemu', '-S']


@pytest.mark.parametrize('bad', [dict(uid=0), dict(gid=0),
                                 dict(program=['qemu']),
                                 dict(unshare=['net']),
                                 dict(daemonize=True),
                                 dict(bind_ports=[70000])])
def test_argv_refuses(bad):
    kw = dict(uid=5, gid=5, program=['/bin/true'])
    kw.update(bad)
    with pytest.raises(ValueError):
        launcher.argv(launcher.Spec(**kw))


def test_parse_status():
    assert launcher.parse_status('exec\n') == launcher.Status(execd=True)
    assert launcher.parse_status('') == launcher.Status(execd=False)
    st = launcher.parse_status('exec\nerror exec: cannot execute /x: '
                               'No such file or directory\n')
    assert (st.execd, st.step, st.reason) == (
        False, 'exec', 'cannot execute /x: No such file or directory')


def test_binary_not_found_says_how_to_build(tmp_path):
    with pytest.raises(launcher.LauncherNotFound, match='make -C native'):
        launcher.binary(str(tmp_path / 'nope'))


# -- the builds -------------------------------------------------------------

@needs_cc
def test_builds_warning_free_with_werror():
    p = subprocess.run(['make', '-B', '-C', NATIVE, 'launcher', 'CC=gcc'],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert 'warning' not in p.stderr.lower(), p.stderr


@pytest.fixture(scope='module')
def asan_launcher():
    return built_launcher('launcher-asan')


def _no_sanitizer_report(text):
    for marker in SAN_MARKERS:
        assert marker not in text, text


@needs_cc
@pytest.mark.parametrize('case', ['ok', 'daemonized', 'uid0', 'cgroup',
                                  'landlock', 'exec', 'usage'])
@ROOT_AND_LANDLOCK[0]
@ROOT_AND_LANDLOCK[1]
def test_asan_build(asan_launcher, case):
    ids, scratch = Uids(), scratch_dir()
    try:
        uid = ids.get()
        spec = launcher.Spec(uid=uid, gid=uid, rx=SYSTEM_RX,
                             unshare=('ipc', 'uts', 'mount'),
                             program=['/bin/true'])
        if case == 'daemonized':
            spec = launcher.Spec(**dict(spec.__dict__, daemonize=True,
                                        pid_fd=0))
        elif case == 'cgroup':
            spec.cgroups = [os.path.join(scratch, 'none')]
        elif case == 'landlock':
            spec.ro = [os.path.join(scratch, 'none')]
        elif case == 'exec':
            spec.program = [os.path.join(scratch, 'none')]
        argv = launcher.argv(spec, asan_launcher)
        if case == 'uid0':
            argv[argv.index('--uid') + 1] = '0'
        elif case == 'usage':
            argv[argv.index('--uid') + 1] = 'x'
        env = dict(spawn.MINIMAL_ENV,
                   ASAN_OPTIONS='detect_leaks=0:abort_on_error=1',
                   UBSAN_OPTIONS='halt_on_error=1:print_stacktrace=1')
        if case in ('uid0', 'usage'):
            p = subprocess.run(argv, capture_output=True, text=True,
                               env=env, timeout=60)
            _no_sanitizer_report(p.stderr)
            assert p.returncode == (14 if case == 'uid0' else 2), p.stderr
            return
        err = os.path.join(scratch, 'stderr')
        with open(err, 'w') as errf:
            try:
                got = spawn.start(spec, launcher_path=asan_launcher,
                                  env=env, stderr=errf)
                if got.proc is not None:
                    assert got.proc.wait(timeout=60) == 0
                else:
                    kill_pid(got.pid)
                failed = None
            except spawn.LaunchFailed as e:
                failed = e
        with open(err) as f:
            text = f.read()
        _no_sanitizer_report(text)
        if case in ('ok', 'daemonized'):
            assert failed is None, text
        else:
            assert failed is not None and failed.step == case, text
    finally:
        ids.release_all()
        remove_dir(scratch)
