"""A real QEMU (TCG) started by QemuHypervisor with [bhyve] sandbox on (the
default): nova-bhyve-launcher, its own uid, no capabilities, no_new_privs,
Landlock, QEMU's seccomp filter, a cgroup with the flavor's limits
(hypervisor/qemu/sandboxed.py, docs/sandbox.md).

The guests boot the test guest's kernel and initrd directly, from an image
cache in a directory of mode 0700 (the VM's uid cannot reach it: QEMU reads
the two files through the descriptors it was handed), with a qcow2 overlay
each. Nothing here is mocked but, in one test, the list of executable
paths, to inject a Landlock failure.
"""
import os
import shutil
import subprocess
import tempfile
import time
import uuid as uuidlib

import pytest

from nova_bhyve import conf
from nova_bhyve import guest
from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.qemu import backend as qemu
from nova_bhyve.hypervisor.qemu import qmp
from nova_bhyve.hypervisor.qemu import sandboxed
from nova_bhyve.sandbox import features

import procfs

CONF = conf.CONF
QEMU = shutil.which('qemu-system-x86_64')

pytestmark = pytest.mark.skipif(
    QEMU is None or os.geteuid() != 0,
    reason='needs qemu-system-x86_64 and root (the launcher changes uid)')



class Host:
    """Instances path, runtime path and image cache of one test; every VM
    started through it is killed (by pid) and released at the end."""

    def __init__(self, manifest):
        self.top = tempfile.mkdtemp(prefix='nbsbx-')
        self.cache = os.path.join(self.top, 'cache')
        os.makedirs(self.cache, mode=0o700)
        os.chmod(self.top, 0o700)
        self.kernel = os.path.join(self.cache, 'vmlinuz')
        self.initrd = os.path.join(self.cache, 'initrd')
        self.base = os.path.join(self.cache, 'base.qcow2')
        shutil.copy(manifest['vmlinuz'], self.kernel)
        shutil.copy(manifest['initrd'], self.initrd)
        shutil.copy(manifest['root_qcow2'], self.base)
        self.cmdline = manifest['cmdline']
        self.instances = os.path.join(self.top, 'instances')
        self.hyp = qemu.QemuHypervisor()
        self.vmdirs = []

    def vm(self, memory_mb=128, quota=None):
        uuid = str(uuidlib.uuid4())
        path = os.path.join(self.instances, uuid)
        os.makedirs(path)
        disk = os.path.join(path, 'disk')
        subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-F',
                        'qcow2', '-b', self.base, disk], check=True)
        spec = guest.VMSpec(
            uuid=uuid, name='sbx', vcpus=1, memory_mb=memory_mb,
            disks=[guest.Disk(path=disk, format='qcow2')],
            boot=guest.Boot(kernel=self.kernel, ramdisk=self.initrd,
                            cmdline=self.cmdline),
            cpu_quota=quota or {})
        vmdir = base.VMDir(path)
        self.vmdirs.append(vmdir)
        return spec, vmdir

    def close(self):
        for vmdir in self.vmdirs:
            self.hyp.kill(vmdir)
        shutil.rmtree(self.top, ignore_errors=True)


@pytest.fixture
def host(test_guest):
    top = tempfile.mkdtemp(prefix='nbsbx-rt-')
    CONF.set_override('qemu_accel', 'tcg', group='bhyve')
    CONF.set_override('runtime_path', os.path.join(top, 'rt'),
                      group='bhyve')
    CONF.set_override('sandbox_uid_range', '64900-64949', group='bhyve')
    h = Host(test_guest)
    try:
        yield h
    finally:
        h.close()
        for opt in ('qemu_accel', 'runtime_path', 'sandbox_uid_range'):
            CONF.clear_override(opt, group='bhyve')
        shutil.rmtree(top, ignore_errors=True)


def _left_behind(hyp, vmdir):
    """What a VM that did not start left: [] when nothing."""
    left = []
    if os.path.exists(vmdir.pidfile):
        left.append('pid file')
    if os.path.exists(vmdir.runtime):
        left.append('runtime dir %s' % vmdir.runtime)
    name = sandboxed.Sandbox.name(vmdir)
    if hyp.sandbox.cgroups.exists(name):
        left.append('cgroup %s' % name)
    if hyp.sandbox.uids.lookup(name) is not None:
        left.append('uid')
    for pid in os.listdir('/proc'):
        if pid.isdigit():
            try:
                with open('/proc/%s/cmdline' % pid, 'rb') as f:
                    if vmdir.uuid.encode() in f.read():
                        left.append('process %s' % pid)
            except OSError:
                pass
    return left


def test_the_host_has_what_the_sandbox_needs():
    # the CI machines do: a failure here is a host problem, named
    assert features.missing() == []


def test_each_vm_process_its_own_uid_no_capabilities_nnp_seccomp(host):
    vms = [host.vm(), host.vm(quota={'quota:cpu_shares': '512'})]
    pids = []
    for spec, vmdir in vms:
        host.hyp.start(spec, vmdir)
        pids.append(host.hyp.pid(vmdir))
    uids = []
    for pid in pids:
        st = procfs.status(pid)
        assert len(set(st['Uid'])) == 1 and st['Uid'][0] != '0', st['Uid']
        assert st['Gid'] == st['Uid'], st['Gid']
        assert st.get('Groups', []) == []
        for cap in ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb'):
            assert int(st[cap][0], 16) == 0, (cap, st[cap])
        assert st['NoNewPrivs'] == ['1']
        assert st['Seccomp'] == ['2']              # filter mode
        uids.append(int(st['Uid'][0]))
        assert 64900 <= uids[-1] <= 64949
    assert uids[0] != uids[1]
    # the monitor works over the socket the driver bound
    for _, vmdir in vms:
        assert qmp.execute(vmdir.control, 'query-status')['status'] == \
            'running'
    # each in its own cgroup, with the flavor's memory + overhead
    sbx = host.hyp.sandbox
    for (spec, vmdir), pid in zip(vms, pids):
        name = sandboxed.Sandbox.name(vmdir)
        assert pid in sbx.cgroups.procs(name)
        limits = sbx.limits(spec)
        assert limits.memory_bytes == (
            128 + CONF.bhyve.sandbox_memory_overhead_mb) * 1024 * 1024
    assert sbx.limits(vms[1][0]).cpu_shares == 512
    # kill gives back the uid and removes the cgroup
    spec, vmdir = vms[0]
    host.hyp.kill(vmdir)
    assert _left_behind(host.hyp, vmdir) == []


def test_the_vm_process_cannot_open_what_it_was_not_handed(host):
    (spec_a, vm_a), (spec_b, vm_b) = host.vm(), host.vm()
    host.hyp.start(spec_a, vm_a)
    host.hyp.start(spec_b, vm_b)
    readable = os.path.join(tempfile.mkdtemp(prefix='nbsbx-open-'), 'pub')
    os.chmod(os.path.dirname(readable), 0o755)
    with open(readable, 'w') as f:
        f.write('world-readable\n')
    os.chmod(readable, 0o644)
    try:
        targets = {'a world-readable host file': readable,
                   "another instance's disk": spec_b.disks[0].path,
                   "its own disk, by path": spec_a.disks[0].path,
                   'the host password file': '/etc/passwd'}
        for what, path in targets.items():
            for i, driver in enumerate(('file', 'raw')):
                args = ({'driver': 'file', 'filename': path,
                         'node-name': 'probe%d' % i, 'read-only': True}
                        if driver == 'file' else
                        {'driver': 'raw', 'node-name': 'probe%d' % i,
                         'file': {'driver': 'file', 'filename': path},
                         'read-only': True})
                with pytest.raises(qmp.QMPError) as err:
                    qmp.execute(vm_a.control, 'blockdev-add', args)
                assert 'Permission denied' in str(err.value), (what, err)
        # and it still runs
        assert qmp.execute(vm_a.control, 'query-status')['status'] == \
            'running'
    finally:
        shutil.rmtree(os.path.dirname(readable))


def test_no_free_uid_stops_the_start_and_leaves_nothing(host):
    CONF.set_override('sandbox_uid_range', '64950-64950', group='bhyve')
    host.hyp._sandbox = None        # a nova-compute started with that range
    (spec_a, vm_a), (spec_b, vm_b) = host.vm(), host.vm()
    host.hyp.start(spec_a, vm_a)
    with pytest.raises(base.HypervisorError, match='no free uid'):
        host.hyp.start(spec_b, vm_b)
    assert _left_behind(host.hyp, vm_b) == []
    assert host.hyp.pid(vm_a) is not None       # the other one untouched


def test_a_landlock_failure_stops_the_start_and_leaves_nothing(
        host, monkeypatch):
    # fault injection: an executable path that does not exist makes the
    # launcher's landlock step fail
    monkeypatch.setattr(sandboxed, 'EXEC_PATHS',
                        ('/usr', '/nonexistent-nova-bhyve'))
    spec, vmdir = host.vm()
    with pytest.raises(base.HypervisorError,
                       match='sandbox step landlock failed.*nonexistent'):
        host.hyp.start(spec, vmdir)
    assert _left_behind(host.hyp, vmdir) == []


def test_a_qemu_that_fails_after_the_sandbox_is_reported_with_its_words(
        host):
    spec, vmdir = host.vm(memory_mb=64 * 1024 * 1024)   # 64 TiB of RAM
    t0 = time.monotonic()
    with pytest.raises(base.HypervisorError,
                       match='(?s)exited while starting: .*(memory|'
                             'allocate)') as err:
        host.hyp.start(spec, vmdir)
    assert time.monotonic() - t0 < sandboxed.READY_TIMEOUT
    # nothing else went wrong in that QEMU's start
    assert 'Permission denied' not in str(err.value)
    assert _left_behind(host.hyp, vmdir) == []
