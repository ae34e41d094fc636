"""Pure parts of suspend/resume, live snapshots and diagnostics.

QEMU: argv and URIs, the state-file check, and the QMP command sequences of
save, restore, freeze and thaw against a fake QEMU behind a real unix
socket (fake_qmp: the descriptors the driver passes arrive as they would
in QEMU; only QEMU is faked). bhyve: bhyvectl
--suspend / bhyve -r with processutils.execute mocked only for bhyvectl
(fake_execute.py).
Snapshot export on real libvdsk images with qemu-img as the oracle.
"""
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from unittest import mock

from nova.compute import power_state
import pytest

from nova_bhyve import conf
from nova_bhyve import diagnostics
from nova_bhyve import guest
from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.bhyve import backend as bhyve
from nova_bhyve.hypervisor.bhyve import config as bhyve_config
from nova_bhyve.hypervisor.bhyve import state as bhyve_state
from nova_bhyve.hypervisor.bhyve import supervisor
from nova_bhyve.hypervisor.qemu import backend as qemu
from nova_bhyve.hypervisor.qemu import blockjob as qemu_blockjob
from nova_bhyve.hypervisor.qemu import resources as qemu_resources
from nova_bhyve.hypervisor.qemu import state as qemu_state
from nova_bhyve.hypervisor.qemu import stats as qemu_stats
from nova_bhyve.storage import snapshot
from nova_bhyve.storage import vdsk

import fake_execute
import fake_qmp

CONF = conf.CONF
UUID = '0e6f1c1a-4b7d-4c55-8a0f-6c2b9d3e4f50'


# -- a fake QMP server --

class FakeQMPServer:
    """Accepts connections until closed; each gets the greeting, the reply
    to qmp_capabilities, then ``handler(command, args)`` answers. Commands
    are recorded in ``self.calls``."""

    def __init__(self, path, handler):
        self.calls = []
        self.handler = handler
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(8)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            with conn, conn.makefile('rwb') as f:
                f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
                f.flush()
                for line in f:
                    req = json.loads(line)
                    if req['execute'] == 'qmp_capabilities':
                        reply = {'return': {}}
                    else:
                        self.calls.append((req['execute'],
                                           req.get('arguments')))
                        try:
                            reply = {'return': self.handler(
                                req['execute'], req.get('arguments'))}
                        except KeyError as e:
                            reply = {'error': {'class': 'GenericError',
                                               'desc': str(e)}}
                    f.write(json.dumps(reply).encode() + b'\n')
                    f.flush()

    def close(self):
        self.srv.close()


@pytest.fixture
def vmdir():
    path = tempfile.mkdtemp(prefix='nb-lc-')     # short: socket paths
    d = base.VMDir(os.path.join(path, UUID))
    os.makedirs(d.path)
    base.make_runtime_dir(d)
    yield d
    shutil.rmtree(path)


class FakeHyp:
    """The bits of a backend qemu_state uses; the VM 'runs' until quit."""

    def __init__(self):
        self.running = True
        self.killed = False

    def pid(self, vmdir):
        return 4242 if self.running else None

    def kill(self, vmdir):
        self.running = False
        self.killed = True


# -- QEMU save / restore --

def test_the_state_travels_as_a_named_descriptor():
    assert qemu_state.fd_uri(qemu_state.SAVE_FD) == 'fd:nb-save'
    assert qemu_state.fd_uri(qemu_state.RESTORE_FD) == 'fd:nb-restore'


def test_incoming_argv_waits_paused_for_its_state_over_qmp():
    argv = ['qemu-system-x86_64', '-name', 'x']
    assert qemu_state.incoming_argv(argv) == [
        'qemu-system-x86_64', '-name', 'x', '-S', '-incoming', 'defer']


def test_restore_argv_is_the_normal_argv_plus_incoming(vmdir):
    s = guest.VMSpec(uuid=UUID, name='i-1', vcpus=1, memory_mb=256,
                     disks=[guest.Disk(path=vmdir.disk())])
    normal = qemu.render_argv(s, vmdir, 'qemu', 'tcg',
                              qemu_resources.numbered(s))
    assert qemu_state.incoming_argv(normal)[:-3] == normal
    assert not any(vmdir.saved_state in a for a in
                   qemu_state.incoming_argv(normal))


def test_check_state_file(vmdir):
    path = vmdir.saved_state
    with pytest.raises(base.HypervisorError, match='does not exist'):
        qemu_state.check_state_file(path)
    with open(path, 'wb') as f:
        f.write(b'garbage!')
    with pytest.raises(base.HypervisorError, match='not a QEMU state'):
        qemu_state.check_state_file(path)
    with open(path, 'wb') as f:
        f.write(qemu_state.MAGIC + b'\0' * 100)
    qemu_state.check_state_file(path)


def test_stopped_state_tells_suspended_from_shut_off(vmdir):
    hv = qemu.QemuHypervisor()
    assert hv.power_state(vmdir) == power_state.SHUTDOWN
    with open(vmdir.saved_state, 'wb') as f:
        f.write(qemu_state.MAGIC)
    assert hv.power_state(vmdir) == power_state.SUSPENDED
    hv.discard_saved_state(vmdir)
    assert hv.power_state(vmdir) == power_state.SHUTDOWN


def _save_handler(hyp, fake, migrate_status='completed'):
    def handler(cmd, args):
        if cmd == 'query-status':
            return {'status': 'running'}
        if cmd == 'migrate':
            # QEMU writes the stream into the descriptor named in the URI
            fd = fake.take(args['uri'].split(':', 1)[1])
            with os.fdopen(fd, 'wb') as f:
                f.write(qemu_state.MAGIC + b'state')
            return {}
        if cmd == 'query-migrate':
            return {'status': migrate_status, 'total-time': 5,
                    'error-desc': 'boom'}
        if cmd == 'quit':
            hyp.running = False
        return {}
    return handler


def _fake_qemu(vmdir, make_handler, *args):
    fake = fake_qmp.FakeQMP(vmdir.control)
    fake.handler = make_handler(*args[:1], fake, *args[1:])
    return fake


def test_save_hands_qemu_the_open_state_file(vmdir):
    hyp = FakeHyp()
    partial = qemu_state.partial_path(vmdir.saved_state)
    with _fake_qemu(vmdir, _save_handler, hyp) as fake:
        qemu_state.save(hyp, vmdir)
    assert fake.commands() == [
        'query-status', 'stop', 'migrate-set-parameters', 'getfd',
        'migrate', 'query-migrate', 'quit']
    assert fake.calls[2][1] == {'max-bandwidth': qemu_state.SAVE_BANDWIDTH}
    # the partial file, created by the driver, travelled with getfd
    assert fake.calls[3][1:] == ({'fdname': 'nb-save'}, [partial])
    assert fake.calls[4][1] == {'uri': 'fd:nb-save'}
    with open(vmdir.saved_state, 'rb') as f:
        assert f.read() == qemu_state.MAGIC + b'state'
    assert os.stat(vmdir.saved_state).st_mode & 0o777 == 0o600
    assert not os.path.exists(partial)


def test_failed_save_removes_the_partial_file_and_resumes(vmdir):
    hyp = FakeHyp()
    with _fake_qemu(vmdir, _save_handler, hyp, 'failed') as fake:
        with pytest.raises(base.HypervisorError, match='boom'):
            qemu_state.save(hyp, vmdir)
    assert fake.commands()[-2:] == ['migrate_cancel', 'cont']
    assert os.listdir(vmdir.path) == []
    assert os.listdir(vmdir.runtime) == ['control.sock']


def test_save_refused_by_qemu_takes_the_descriptor_back(vmdir):
    hyp = FakeHyp()

    def handler(hyp, fake):
        def answer(cmd, args):
            if cmd == 'query-status':
                return {'status': 'running'}
            if cmd == 'migrate':
                raise fake_qmp.Fail('no migration now')
            return {}
        return answer
    with _fake_qemu(vmdir, handler, hyp) as fake:
        with pytest.raises(base.HypervisorError, match='no migration now'):
            qemu_state.save(hyp, vmdir)
        held = fake.open_targets()
    assert fake.commands()[3:] == ['getfd', 'migrate', 'closefd',
                                   'migrate_cancel', 'cont']
    assert held == []
    assert os.listdir(vmdir.path) == []


def _restore_handler(loaded, fake, status='completed'):
    def handler(cmd, args):
        if cmd == 'migrate-incoming':
            fd = fake.take(args['uri'].split(':', 1)[1])
            loaded.append(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE)
            with os.fdopen(fd, 'rb') as f:
                loaded.append(f.read())
            return {}
        if cmd == 'query-migrate':
            return {'status': status, 'error-desc': 'bad section'}
        return {}
    return handler


def test_restore_hands_qemu_the_open_state_file(vmdir):
    """launch is mocked (it would start QEMU; the real one is in
    tests/interop/test_qemu_runtime_fds.py): the argv it gets and the QMP
    sequence after it are pinned."""
    with open(vmdir.saved_state, 'wb') as f:
        f.write(qemu_state.MAGIC + b'state')
    loaded = []
    with _fake_qemu(vmdir, _restore_handler, loaded) as fake:
        with mock.patch.object(qemu_state, 'launch') as launch:
            qemu_state.restore(FakeHyp(), ['qemu'], vmdir, UUID, fds=[7],
                               spec='the spec')
    launch.assert_called_once_with(
        mock.ANY, ['qemu', '-S', '-incoming', 'defer'], vmdir, UUID, [7],
        'the spec')
    assert [(c, a) for c, a, _ in fake.calls] == [
        ('getfd', {'fdname': 'nb-restore'}),
        ('migrate-incoming', {'uri': 'fd:nb-restore'}),
        ('query-migrate', None), ('cont', None)]
    assert fake.calls[0][2] == [vmdir.saved_state]
    assert loaded == [os.O_RDONLY, qemu_state.MAGIC + b'state']
    assert not os.path.exists(vmdir.saved_state)


def test_failed_restore_kills_qemu_and_keeps_the_state(vmdir):
    with open(vmdir.saved_state, 'wb') as f:
        f.write(qemu_state.MAGIC + b'state')
    hyp = FakeHyp()
    with _fake_qemu(vmdir, _restore_handler, [], 'failed'):
        with mock.patch.object(qemu_state, 'launch'):
            with pytest.raises(base.HypervisorError,
                               match='cannot resume.*bad section'):
                qemu_state.restore(hyp, ['qemu'], vmdir, UUID)
    assert hyp.killed
    assert os.path.exists(vmdir.saved_state)


def test_restore_refuses_a_missing_file_without_starting_qemu(vmdir):
    with mock.patch.object(qemu_state, 'launch') as launch:
        with pytest.raises(base.HypervisorError, match='does not exist'):
            qemu_state.restore(FakeHyp(), ['qemu'], vmdir, UUID)
    launch.assert_not_called()


# -- QEMU live snapshot: freeze / thaw --

def _freeze_handler(snapshot_error=None):
    nodes = [{'node-name': 'disk0', 'file': '/dev/fdset/1',
              'image': {'virtual-size': 3 << 20}}]

    def handler(cmd, args):
        if cmd == 'query-named-block-nodes':
            return nodes
        if cmd == 'blockdev-add':
            nodes.append({'node-name': args['node-name'],
                          'file': args['file']['filename']})
        if cmd == 'blockdev-del':
            nodes.pop()
        if cmd == 'blockdev-snapshot' and snapshot_error:
            raise fake_qmp.Fail(snapshot_error)
        return {}
    return handler


def test_freeze_creates_the_overlay_and_hands_qemu_its_descriptor(vmdir):
    overlay = os.path.join(vmdir.path, 'ov.qcow2')
    disk = vmdir.disk()
    vdsk.create(disk, 'qcow2', 3 << 20)
    with fake_qmp.FakeQMP(vmdir.control, _freeze_handler()) as fake:
        qemu_blockjob.freeze(vmdir.control, 0, overlay,
                             backing=disk, backing_fmt='qcow2')
        modes = {o: fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
                 for s in fake.fdsets.values() for fd, o in s}
    assert [(c, a) for c, a, _ in fake.calls] == [
        ('query-named-block-nodes', None),
        ('add-fd', {'opaque': overlay}),
        # backing null: QEMU opens no backing file by the header's name
        ('blockdev-add', {'driver': 'qcow2', 'node-name': 'disk0-snap',
                          'discard': 'unmap', 'backing': None,
                          'file': {'driver': 'file',
                                   'filename': '/dev/fdset/0'}}),
        ('blockdev-snapshot', {'node': 'disk0', 'overlay': 'disk0-snap'})]
    assert fake.calls[1][2] == [overlay]
    assert modes == {overlay: os.O_RDWR}
    info = vdsk.info(overlay)
    assert (info['format'], info['virtual_size'], info['backing_file'],
            info['backing_format']) == ('qcow2', 3 << 20, disk, 'qcow2')


def test_freeze_refused_leaves_qemu_as_it_was(vmdir):
    overlay = os.path.join(vmdir.path, 'ov.qcow2')
    with fake_qmp.FakeQMP(vmdir.control,
                          _freeze_handler('no pivot')) as fake:
        with pytest.raises(base.HypervisorError, match='no pivot'):
            qemu_blockjob.freeze(vmdir.control, 0, overlay)
        held = fake.open_targets()
    assert fake.commands() == [
        'query-named-block-nodes', 'add-fd', 'blockdev-add',
        'blockdev-snapshot', 'blockdev-del', 'query-named-block-nodes',
        'remove-fd']
    assert held == []
    # without a backing name: nothing in the header
    assert vdsk.info(overlay)['backing_file'] is None


def test_commit_stops_at_the_instance_disk():
    # without base-node QEMU would commit into the cached base image
    cmd, args = qemu_blockjob.commit_command(0)
    assert cmd == 'block-commit'
    assert args['base-node'] == 'disk0'
    assert args['top-node'] == args['device'] == 'disk0-snap'


def test_thaw_sequence(vmdir):
    overlay = os.path.join(vmdir.path, 'ov.qcow2')
    open(overlay, 'w').close()
    polls = iter([[{'device': 'nb-commit-disk0', 'ready': False}],
                  [{'device': 'nb-commit-disk0', 'ready': True}],
                  [{'device': 'nb-commit-disk0', 'ready': True}], []])
    nodes = [{'node-name': 'disk0', 'file': '/dev/fdset/1'},
             {'node-name': 'disk0-snap', 'file': '/dev/fdset/0'}]

    def handler(cmd, args):
        if cmd == 'query-block-jobs':
            return next(polls)
        if cmd == 'query-block':
            return [{'inserted': {'node-name': 'disk0'}}]
        if cmd == 'query-named-block-nodes':
            return nodes
        if cmd == 'blockdev-del':
            nodes.pop()
        return {}
    with fake_qmp.FakeQMP(vmdir.control, handler) as fake:
        for fdset, path in ((0, overlay), (1, vmdir.path)):
            fake.fdsets[fdset] = [(os.open(path, os.O_RDONLY), path)]
        qemu_blockjob.thaw(vmdir.control, 0, overlay)
        left = sorted(fake.fdsets)
    assert fake.commands() == [
        'block-commit', 'query-block-jobs', 'query-block-jobs',
        'block-job-complete', 'query-block-jobs', 'query-block-jobs',
        'query-block', 'query-named-block-nodes', 'query-fdsets',
        'blockdev-del', 'query-named-block-nodes', 'remove-fd']
    assert fake.calls[3][1] == {'device': 'nb-commit-disk0'}
    assert fake.calls[9][1] == {'node-name': 'disk0-snap'}
    assert fake.calls[11][1] == {'fdset-id': 0}
    # the disk's own set stays
    assert left == [1]
    assert not os.path.exists(overlay)


def test_thaw_that_leaves_the_overlay_on_top_is_an_error(vmdir):
    overlay = os.path.join(vmdir.path, 'ov.qcow2')
    open(overlay, 'w').close()

    def handler(cmd, args):
        if cmd == 'query-block-jobs':
            return []
        if cmd == 'query-block':
            return [{'inserted': {'node-name': 'disk0-snap'}}]
        return {}
    srv = FakeQMPServer(vmdir.control, handler)
    try:
        with pytest.raises(base.HypervisorError, match='disk0-snap'):
            qemu_blockjob.thaw(vmdir.control, 0, overlay)
    finally:
        srv.close()
    assert os.path.exists(overlay)


# -- snapshot export (real libvdsk, qemu-img as the oracle) --

@pytest.mark.parametrize('fmt', ['qcow2', 'raw'])
def test_export_flattens_the_chain(tmp_path, fmt):
    base_img = str(tmp_path / 'base.qcow2')
    top = str(tmp_path / 'disk.qcow2')
    out = str(tmp_path / ('out.' + fmt))
    size = 8 * 1024 * 1024
    vdsk.create(base_img, 'qcow2', size)
    with vdsk.open(base_img) as img:
        img.write(0, b'B' * 65536)
        img.write(3 * 1024 * 1024, b'b' * 4096)
    vdsk.create(top, 'qcow2', 0, backing=base_img, backing_fmt='qcow2')
    with vdsk.open(top) as img:
        img.write(65536, b'T' * 65536)
        img.write(0, b'X' * 512)
    written = snapshot.export(top, 'qcow2', out, fmt)
    assert written == 3 * 65536             # zero clusters not written
    info = vdsk.info(out)
    assert info['format'] == fmt and info['backing_file'] is None
    assert info['virtual_size'] == size
    subprocess.run(['qemu-img', 'compare', '-f', 'qcow2', '-F', fmt, top,
                    out], check=True, capture_output=True)


def test_target_format():
    inst = mock.Mock(system_metadata={'image_disk_format': 'raw'})
    assert snapshot.target_format(inst) == 'raw'
    inst.system_metadata = {'image_disk_format': 'vmdk'}
    assert snapshot.target_format(inst) == 'qcow2'
    inst.system_metadata = {}
    assert snapshot.target_format(inst) == 'qcow2'


# -- diagnostics --

STATS = {'pid': 1, 'uptime': 42, 'cpus': [(0, 5000), (1, 7000)],
         'memory_max_mb': 256, 'memory_used_mb': 200,
         'disks': [{'name': 'vda', 'read_bytes': 1, 'read_requests': 2,
                    'write_bytes': 3, 'write_requests': 4, 'errors': 0}],
         'nics': []}


def test_instance_diagnostics():
    d = diagnostics.instance_diagnostics(power_state.RUNNING, STATS, 'qemu')
    assert (d.state, d.hypervisor, d.uptime, d.num_cpus, d.num_disks,
            d.num_nics) == ('running', 'qemu', 42, 2, 1, 0)
    assert not d.obj_attr_is_set('driver')
    assert [(c.id, c.time) for c in d.cpu_details] == [(0, 5000), (1, 7000)]
    assert (d.memory_details.maximum, d.memory_details.used) == (256, 200)
    assert d.disk_details[0].write_requests == 4


def test_diagnostics_of_a_stopped_vm():
    d = diagnostics.instance_diagnostics(power_state.SUSPENDED, None, 'qemu')
    assert d.state == 'suspended' and d.num_cpus == 0


def test_legacy_diagnostics():
    assert diagnostics.legacy_diagnostics(STATS) == {
        'cpu0_time': 5000, 'cpu1_time': 7000, 'memory': 262144,
        'memory-rss': 204800, 'vda_read': 1, 'vda_read_req': 2,
        'vda_write': 3, 'vda_write_req': 4, 'vda_errors': 0, 'uptime': 42}


def test_thread_cpu_time_from_proc(tmp_path):
    task = tmp_path / '7' / 'task' / '9'
    task.mkdir(parents=True)
    # pid (comm with ) space) state ppid ... utime=300 stime=200
    fields = ['S'] + ['0'] * 10 + ['300', '200'] + ['0'] * 30
    (task / 'stat').write_text('9 (CPU 0/TCG) x) ' + ' '.join(fields))
    hz = os.sysconf('SC_CLK_TCK')
    assert qemu_stats.thread_cpu_ns(7, 9, proc=str(tmp_path)) == (
        500 * 1000000000 // hz)


# -- bhyve: bhyvectl --suspend / bhyve -r --

USAGE_SNAPSHOT = ('Usage: bhyvectl --vm=<vmname>\n'
                  '       [--checkpoint=<filename> | --suspend=<filename>]\n')


@pytest.mark.parametrize('usage, expected', [
    (USAGE_SNAPSHOT, True), ('Usage: bhyvectl --vm=<vmname>\n', False)])
def test_bhyve_snapshot_support_is_detected_from_usage(usage, expected):
    with fake_execute.patch(rc=1, err=usage) as execute:
        assert bhyve_state.snapshot_supported('/usr/sbin/bhyvectl') is \
            expected
    assert fake_execute.argvs(execute) == [['/usr/sbin/bhyvectl', '--help']]


@pytest.fixture
def unjailed():
    """bhyve outside a jail: a jailed bhyve cannot be suspended
    (test_bhyve_sandbox.py)."""
    CONF.set_override('sandbox_jail', False, group='bhyve')
    yield
    CONF.clear_override('sandbox_jail', group='bhyve')


def _bhyve_vmdir(vmdir):
    s = guest.VMSpec(uuid=UUID, name='instance-0000002b', vcpus=1,
                     memory_mb=256,
                     disks=[guest.Disk(path='/d/r', format='raw')])
    bhyve_config.write_config(bhyve_config.render_config(s, vmdir),
                       bhyve.BhyveHypervisor.config_path(vmdir))
    return s


def test_bhyve_without_snapshot_support_refuses(vmdir):
    hv = bhyve.BhyveHypervisor()
    hv._snapshot_support = False
    with pytest.raises(NotImplementedError):
        hv.save(vmdir)
    with pytest.raises(NotImplementedError):
        hv.restore(None, vmdir)


@pytest.mark.usefixtures('unjailed')
def test_bhyve_save(vmdir):
    _bhyve_vmdir(vmdir)
    hv = bhyve.BhyveHypervisor()
    hv._snapshot_support = True
    partial = bhyve_state.partial_path(vmdir.saved_state)
    running = [True]

    def bhyvectl(argv):
        # bhyve writes FILE, FILE.kern, FILE.meta and exits
        for p in bhyve_state.files(partial):
            open(p, 'w').close()
        running[0] = False
        return 0, '', ''
    with fake_execute.patch(bhyvectl) as execute, \
            mock.patch.object(hv, 'pid',
                              side_effect=lambda v: 77 if running[0]
                              else None), \
            mock.patch.object(hv, 'supervisor_pid', return_value=66), \
            mock.patch.object(hv, 'vmm_exists', return_value=False), \
            mock.patch.object(bhyve_state.os, 'kill') as kill, \
            mock.patch.object(bhyve_state.base, 'wait_for_exit',
                              return_value=True):
        hv.save(vmdir)
    assert fake_execute.argvs(execute) == [
        ['/usr/sbin/bhyvectl', '--vm=instance-0000002b',
         '--suspend=%s' % partial]]
    kill.assert_called_once_with(66, signal.SIGUSR1)
    assert all(os.path.exists(p)
               for p in bhyve_state.files(vmdir.saved_state))
    assert not os.path.exists(partial)
    assert supervisor.read_exit_status(vmdir.path)['outcome'] == 'suspended'
    with mock.patch.object(hv, 'pid', return_value=None), \
            mock.patch.object(hv, 'supervisor_pid', return_value=None):
        assert hv.power_state(vmdir) == power_state.SUSPENDED


@pytest.mark.usefixtures('unjailed')
def test_bhyve_failed_suspend_keeps_the_vm_rebooting(vmdir):
    _bhyve_vmdir(vmdir)
    hv = bhyve.BhyveHypervisor()
    hv._snapshot_support = True
    with fake_execute.patch(rc=1, err='no snapshot'), \
            mock.patch.object(hv, 'pid', return_value=77), \
            mock.patch.object(hv, 'supervisor_pid', return_value=66), \
            mock.patch.object(bhyve_state.os, 'kill') as kill:
        with pytest.raises(base.HypervisorError, match='no snapshot'):
            hv.save(vmdir)
    assert [c[0] for c in kill.call_args_list] == [
        (66, signal.SIGUSR1), (66, signal.SIGUSR2)]
    assert not os.path.exists(vmdir.saved_state)


@pytest.mark.usefixtures('unjailed')
def test_bhyve_restore_argv_and_state_check(vmdir):
    s = _bhyve_vmdir(vmdir)
    CONF.set_override('bhyve_bootrom', '/dev/null', group='bhyve')
    try:
        hv = bhyve.BhyveHypervisor()
        hv._snapshot_support = True
        with pytest.raises(base.HypervisorError, match='missing'):
            hv.restore(s, vmdir)
        for p in bhyve_state.files(vmdir.saved_state):
            open(p, 'w').close()
        with mock.patch.object(bhyve.supervisor, 'spawn') as spawn, \
                mock.patch.object(hv, 'vmm_exists', return_value=False), \
                mock.patch.object(bhyve_state, 'wait_started',
                                  return_value=True):
            hv.restore(s, vmdir)
        assert spawn.call_args[0][1] == [
            '/usr/sbin/bhyve', '-k', hv.config_path(vmdir)]
        # -r only on the first start: a later guest reboot boots normally
        assert spawn.call_args[1]['first_run_args'] == [
            '-r', vmdir.saved_state]
        assert not any(os.path.exists(p)
                       for p in bhyve_state.files(vmdir.saved_state))
    finally:
        CONF.clear_override('bhyve_bootrom', group='bhyve')


def test_supervisor_hold_signal_makes_the_next_exit_final():
    sup = supervisor.Supervisor('/nonexistent', ['true'])
    sup._on_hold_signal(signal.SIGUSR1, None)
    assert supervisor.decide('bhyve', 0, sup.stop_requested).action == \
        supervisor.STOP
    sup._on_hold_signal(signal.SIGUSR2, None)
    assert supervisor.decide('bhyve', 0, sup.stop_requested).action == \
        supervisor.RESTART


# -- snapshot: the frozen-disk context -------------------------------------

def test_frozen_disk_of_a_stopped_vm_touches_nothing(vmdir):
    hv = mock.Mock()
    hv.is_running.return_value = False
    with snapshot.frozen_disk(hv, vmdir, 0, None):
        pass
    hv.freeze_disk.assert_not_called()
    hv.thaw_disk.assert_not_called()


def test_frozen_disk_thaws_when_the_export_fails(vmdir):
    hv = mock.Mock()
    hv.is_running.return_value = True
    overlay = os.path.join(vmdir.path, 'snapshot-overlay-0.qcow2')
    with pytest.raises(OSError):
        with snapshot.frozen_disk(hv, vmdir, 0, None):
            raise OSError(28, 'No space left on device')
    hv.freeze_disk.assert_called_once_with(vmdir, 0, overlay, disk=None)
    hv.thaw_disk.assert_called_once_with(vmdir, 0, overlay)
