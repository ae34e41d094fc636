"""hypervisor/base.py: VMDir naming, process liveness with the recycled-pid
marker, waiting and killing - on real child `sleep` processes started here
and stopped by their PID - and the graceful shutdown loop of Hypervisor with
a fake backend (the one thing that stands in for a hypervisor: it counts
request_shutdown calls and plays a guest that powers off on the Nth one).
"""
import hashlib
import os
import shutil
import signal
import tempfile
import time
from unittest import mock

from nova.compute import power_state
import pytest

from nova_bhyve.hypervisor import base

UUID = '2f4e8a5c-0d6b-4a3e-9c71-5b8d2e6f1a90'
OTHER = '9a1b2c3d-4e5f-4a6b-8c7d-0e1f2a3b4c5d'


@pytest.fixture
def vmdir():
    path = tempfile.mkdtemp(prefix='nb-base-')
    vm = os.path.join(path, UUID)
    os.mkdir(vm)
    yield base.VMDir(vm)
    shutil.rmtree(path)


@pytest.fixture
def spawn(spawn_marked):
    """A marked `sleep` (see conftest.spawn_marked), this test's uuid by
    default."""
    def start(seconds=60, marker=UUID, reap=True):
        return spawn_marked(marker, seconds, reap)
    return start


def write_pid(vmdir, pid):
    with open(vmdir.pidfile, 'w') as f:
        f.write('%d\n' % pid)


# -- VMDir --------------------------------------------------------------------

def test_vmdir_paths():
    d = base.VMDir('/i/' + UUID + '/', runtime_root='/run/nb')
    assert d.uuid == UUID
    assert (d.spec, d.pidfile, d.console_log, d.exit_status, d.disk(),
            d.disk('disk.config')) == tuple(
        os.path.join('/i/' + UUID + '/', n) for n in (
            'spec.json', 'vm.pid', 'console.log', 'exit.status', 'disk',
            'disk.config'))
    # the sockets: in the runtime directory, named after the VM directory
    digest = hashlib.sha256(('/i/' + UUID).encode()).hexdigest()[:10]
    runtime = '/run/nb/%s-%s' % (UUID, digest)
    assert d.runtime == runtime
    assert (d.control, d.events, d.serial) == tuple(
        os.path.join(runtime, n) for n in (
            'control.sock', 'events.sock', 'serial.sock'))


def test_runtime_dir_is_short_whatever_the_instances_path():
    """A 200-character instances_path: every socket path still fits in a
    unix socket address (107 bytes) with the default runtime_path, and
    the runtime directory of another VM directory (an incoming live
    migration's, another host's on this machine) differs."""
    long_path = '/' + 'x' * 199
    d = base.VMDir(os.path.join(long_path, UUID),
                   runtime_root='/run/nova-bhyve')
    for sock in (d.control, d.events, d.serial):
        assert len(sock.encode()) <= base.SUN_PATH_MAX
    assert len(os.path.basename(d.runtime)) == base.RUNTIME_NAME_LEN
    other = base.VMDir(os.path.join(long_path, 'y', UUID),
                       runtime_root='/run/nova-bhyve')
    assert other.runtime != d.runtime
    assert base.VMDir(d.path + '/', runtime_root='/run/nova-bhyve'
                      ).runtime == d.runtime
    # the longest runtime_path allowed still fits; one byte more is refused
    root = '/' + 'r' * (base.RUNTIME_ROOT_MAX - 1)
    base.check_runtime_root(root)
    assert len(base.VMDir(d.path, runtime_root=root).events) == \
        base.SUN_PATH_MAX
    with pytest.raises(base.HypervisorError, match='too long'):
        base.check_runtime_root(root + 'r')


def test_make_and_remove_runtime_dir(vmdir):
    d = base.VMDir(vmdir.path,
                   runtime_root=os.path.join(os.path.dirname(vmdir.path),
                                             'rt'))
    base.make_runtime_dir(d)
    assert os.stat(d.runtime).st_mode & 0o777 == 0o700
    open(d.control, 'w').close()          # stale: a fresh one is empty
    base.make_runtime_dir(d)
    assert os.listdir(d.runtime) == []
    open(d.events, 'w').close()
    incoming = base.VMDir(os.path.join(d.path, 'in-x'),
                          runtime_root=d.runtime_root)
    base.make_runtime_dir(incoming)
    open(incoming.control, 'w').close()
    base.move_runtime_dir(incoming, d)
    assert os.listdir(d.runtime) == ['control.sock']
    assert not os.path.exists(incoming.runtime)
    base.remove_runtime_dir(d)
    base.remove_runtime_dir(d)             # idempotent
    assert os.listdir(d.runtime_root) == []


@pytest.mark.parametrize('content,pid', [
    (None, None), ('', None), ('0\n', None), ('junk\n', None),
    ('4242\n', 4242), ('  77 ', 77)])
def test_read_pid(vmdir, content, pid):
    if content is not None:
        with open(vmdir.pidfile, 'w') as f:
            f.write(content)
    assert vmdir.read_pid() == pid


# -- process_alive ------------------------------------------------------------

def test_process_alive_with_marker(spawn):
    proc = spawn()
    assert base.process_alive(proc.pid)
    assert base.process_alive(proc.pid, UUID)
    # the pid now belongs to some other program: not our VM
    assert not base.process_alive(proc.pid, OTHER)


def test_process_alive_after_exit(spawn):
    proc = spawn()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not base.process_alive(proc.pid)
    assert not base.process_alive(proc.pid, UUID)


@pytest.mark.parametrize('pid', [None, 0])
def test_process_alive_no_pid(pid):
    assert not base.process_alive(pid)
    assert not base.process_alive(pid, UUID)


def test_process_alive_trusts_kill0_without_procfs(spawn):
    proc = spawn()
    # Simulates FreeBSD without linprocfs (cannot run here): no cmdline.
    with mock.patch.object(base, '_cmdline', return_value=None):
        assert base.process_alive(proc.pid, OTHER)


def test_unreaped_zombie_with_marker_counts_as_gone(spawn):
    proc = spawn(reap=False)
    os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not open('/proc/%d/stat' % proc.pid).read().split(') ')[1] \
            .startswith('Z'):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not base.process_alive(proc.pid, UUID)


# -- wait_for_exit ------------------------------------------------------------

def test_wait_for_exit_returns_when_process_ends(spawn):
    proc = spawn(seconds=0.3)
    start = time.monotonic()
    assert base.wait_for_exit(proc.pid, 10, UUID)
    assert 0.2 <= time.monotonic() - start < 5


def test_wait_for_exit_times_out(spawn):
    proc = spawn()
    start = time.monotonic()
    assert not base.wait_for_exit(proc.pid, 0.3, UUID)
    assert time.monotonic() - start >= 0.3
    assert proc.poll() is None


def test_wait_for_exit_zero_timeout(spawn):
    proc = spawn()
    assert not base.wait_for_exit(proc.pid, 0, UUID)
    assert base.wait_for_exit(None, 0)


# -- kill_and_wait ------------------------------------------------------------

def test_kill_and_wait_kills(spawn):
    proc = spawn()
    base.kill_and_wait(proc.pid, UUID)
    assert not base.process_alive(proc.pid, UUID)
    deadline = time.monotonic() + 10
    while proc.returncode is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.returncode == -signal.SIGKILL


def test_kill_and_wait_spares_recycled_pid(spawn):
    proc = spawn()
    base.kill_and_wait(proc.pid, OTHER)
    time.sleep(0.1)
    assert proc.poll() is None       # not ours: left alone


def test_kill_and_wait_nothing_to_do():
    assert base.kill_and_wait(None, UUID) is None


def test_kill_and_wait_raises_if_process_stays(spawn):
    # Our own unreaped child stays a zombie: kill(pid, 0) still succeeds,
    # so without a marker it never looks gone.
    proc = spawn(reap=False)
    with pytest.raises(base.HypervisorError) as e:
        base.kill_and_wait(proc.pid, timeout=0.3)
    assert 'process %d did not exit after SIGKILL' % proc.pid in \
        str(e.value)


# -- Hypervisor.shutdown ------------------------------------------------------

class FakeHypervisor(base.Hypervisor):
    """Counts ACPI power-off requests; the 'guest' (a real process) exits
    on request number ``off_at`` (never if None)."""
    name = 'fake'

    def __init__(self, off_at=None, state=power_state.RUNNING):
        self.off_at = off_at
        self.requests = []
        self.state = state

    def start(self, spec, vmdir):
        raise NotImplementedError()

    def power_state(self, vmdir):
        return self.state

    def request_shutdown(self, vmdir):
        self.requests.append(time.monotonic())
        if self.off_at is not None and len(self.requests) == self.off_at:
            os.kill(vmdir.read_pid(), signal.SIGTERM)

    def kill(self, vmdir):
        raise NotImplementedError()


def test_shutdown_not_running_is_true_without_requests(vmdir):
    hv = FakeHypervisor(off_at=1)
    assert hv.shutdown(vmdir, 5, 1) is True
    assert hv.requests == []


def test_shutdown_recycled_pid_is_not_ours(vmdir, spawn):
    proc = spawn(marker=OTHER)
    write_pid(vmdir, proc.pid)
    hv = FakeHypervisor(off_at=1)
    assert hv.shutdown(vmdir, 5, 1) is True
    assert hv.requests == []
    assert proc.poll() is None


def test_shutdown_first_request_honoured(vmdir, spawn):
    write_pid(vmdir, spawn().pid)
    hv = FakeHypervisor(off_at=1)
    start = time.monotonic()
    assert hv.shutdown(vmdir, 10, 5) is True
    assert len(hv.requests) == 1
    assert time.monotonic() - start < 4


def test_shutdown_repeats_request_until_guest_goes(vmdir, spawn):
    proc = spawn()
    write_pid(vmdir, proc.pid)
    hv = FakeHypervisor(off_at=3)
    assert hv.shutdown(vmdir, 10, 0.2) is True
    assert len(hv.requests) == 3
    gaps = [b - a for a, b in zip(hv.requests, hv.requests[1:])]
    assert all(0.19 <= g < 2 for g in gaps), gaps
    assert not base.process_alive(proc.pid, UUID)


def test_shutdown_gives_up_at_timeout(vmdir, spawn):
    proc = spawn()
    write_pid(vmdir, proc.pid)
    hv = FakeHypervisor(off_at=None)
    start = time.monotonic()
    assert hv.shutdown(vmdir, 1.0, 0.25) is False
    elapsed = time.monotonic() - start
    assert 1.0 <= elapsed < 3
    assert 3 <= len(hv.requests) <= 5, hv.requests
    assert proc.poll() is None          # shutdown never kills


def test_shutdown_interval_longer_than_timeout(vmdir, spawn):
    write_pid(vmdir, spawn().pid)
    hv = FakeHypervisor(off_at=None)
    start = time.monotonic()
    assert hv.shutdown(vmdir, 0.3, 30) is False
    assert time.monotonic() - start < 3
    assert len(hv.requests) == 1


@pytest.mark.parametrize('state,running', [
    (power_state.RUNNING, True), (power_state.PAUSED, True),
    (power_state.SHUTDOWN, False), (power_state.CRASHED, False),
    (power_state.NOSTATE, False), (power_state.SUSPENDED, False)])
def test_is_running(vmdir, state, running):
    assert FakeHypervisor(state=state).is_running(vmdir) is running


def test_pid_checks_marker(vmdir, spawn):
    hv = FakeHypervisor()
    assert hv.pid(vmdir) is None
    mine = spawn()
    write_pid(vmdir, mine.pid)
    assert hv.pid(vmdir) == mine.pid
    write_pid(vmdir, spawn(marker=OTHER).pid)
    assert hv.pid(vmdir) is None


def test_default_host_info_and_unsupported_pause(vmdir):
    hv = FakeHypervisor()
    assert hv.host_info() == {'hypervisor_type': 'fake',
                              'hypervisor_version': 0}
    with pytest.raises(NotImplementedError):
        hv.pause(vmdir)
    with pytest.raises(NotImplementedError):
        hv.unpause(vmdir)
