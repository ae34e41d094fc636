"""bhyve live migration through the driver-level flow (nova_bhyve
.live_migration's pre-checks, BhyveHypervisor's prepare_incoming /
finish_incoming / migrate_to and the handle the orchestration drives).

NEVER RUN ON FREEBSD. What cannot run here is replaced, and only that:
bhyvectl (``processutils.execute``, fake_execute.py: its usage text and the
--migrate-live request, argv recorded), bhyve (the shell stand-in of
test_bhyve_backend.py run by the real supervisor: it records its argv) and
the source's bhyve process (a sleeping process whose command line carries
the instance uuid). Every process is stopped by its PID.
"""
import json
import os
import signal
import subprocess
import sys
import time
import types

from nova import exception
import pytest

from nova_bhyve import conf
from nova_bhyve import guest
from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.bhyve import backend as bhyve
from nova_bhyve.hypervisor.bhyve import config as bhyve_config
from nova_bhyve.hypervisor.bhyve import migration as bm
from nova_bhyve.hypervisor.bhyve import supervisor
from nova_bhyve.migration import live as live_migration
from nova_bhyve.migration import policy as mp

import fake_execute
from test_bhyve_backend import Fake
from test_bhyve_migration import LIVE_USAGE
from test_bhyve_migration import UPSTREAM_USAGE
from test_bhyve_migration import WARM_USAGE

CONF = conf.CONF
UUID = '6d5ba3a0-55a1-4c7c-9a43-3d1b0f6a2b11'
NAME = 'instance-0000002a'


@pytest.fixture(autouse=True)
def _conf():
    # the prototype's migration runs only with bhyve outside a jail (its
    # bhyvectl reaches bhyve through /var/run/bhyve): refused in the jail,
    # see test_bhyve_sandbox.py
    CONF.set_override('sandbox_jail', False, group='bhyve')
    yield
    for opt in ('bhyve_path', 'bhyvectl_path', 'bhyve_wired_memory',
                'live_migration_bandwidth', 'sandbox_jail'):
        CONF.clear_override(opt, group='bhyve')


def _spec():
    return guest.VMSpec(uuid=UUID, name=NAME, vcpus=1, memory_mb=256,
                        disks=[guest.Disk(path='/shared/%s/disk' % UUID,
                                          format='raw')],
                        nics=[], boot=guest.Boot())


def hypervisor(usage):
    """A BhyveHypervisor whose bhyvectl prints ``usage`` for --help."""
    hyp = bhyve.BhyveHypervisor()
    with fake_execute.patch(rc=1, err=usage) as execute:
        hyp.migration_support()
    assert fake_execute.argvs(execute) == [
        [CONF.bhyve.bhyvectl_path, '--help']]
    return hyp


class _Drv:
    def __init__(self, tmp_path, hyp):
        self.instances_path = str(tmp_path / 'instances')
        os.makedirs(self.instances_path, exist_ok=True)
        self.host_name = 'src'
        self.hypervisor = hyp
        self.vmdir = base.VMDir(os.path.join(self.instances_path, UUID))
        os.makedirs(self.vmdir.path, exist_ok=True)
        bhyve_config.write_config(
            bhyve_config.render_config(_spec(), self.vmdir),
            hyp.config_path(self.vmdir))
        hyp.is_running = lambda vmdir: True
        self.store = types.SimpleNamespace(
            vmdir=lambda instance: self.vmdir)


def _instance():
    return types.SimpleNamespace(
        uuid=UUID, config_drive=False, metadata={}, system_metadata={},
        image_meta=types.SimpleNamespace(properties={}))


def _checks(drv, block=None):
    data = live_migration.dest_check(drv, _instance(), block, False)
    return live_migration.source_check(drv, _instance(), data, None)


def test_live_migration_claimed_only_with_the_prototype():
    assert hypervisor(LIVE_USAGE).supports_live_migration
    assert not hypervisor(WARM_USAGE).supports_live_migration
    assert not hypervisor(UPSTREAM_USAGE).supports_live_migration
    assert not bhyve.BhyveHypervisor.supports_block_migration


def test_upstream_bhyve_is_refused_at_the_destination_check(tmp_path):
    drv = _Drv(tmp_path, hypervisor(UPSTREAM_USAGE))
    with pytest.raises(exception.MigrationPreCheckError,
                       match='cannot live-migrate'):
        live_migration.dest_check(drv, _instance(), None, False)


def test_block_migration_is_refused_with_the_reason(tmp_path):
    CONF.set_override('bhyve_wired_memory', True, group='bhyve')
    drv = _Drv(tmp_path, hypervisor(LIVE_USAGE))
    # asked for explicitly: refused on the destination
    with pytest.raises(exception.MigrationPreCheckError,
                       match='instances path must be shared'):
        live_migration.dest_check(drv, _instance(), True, False)
    # 'auto' with local disks (no shared probe): refused on the source
    data = live_migration.dest_check(drv, _instance(), None, False)
    os.unlink(os.path.join(drv.instances_path, data.filename))
    with pytest.raises(exception.MigrationPreCheckError,
                       match='instances path must be shared'):
        live_migration.source_check(drv, _instance(), data, None)


def test_shared_path_wired_vm_passes_the_checks(tmp_path):
    CONF.set_override('bhyve_wired_memory', True, group='bhyve')
    drv = _Drv(tmp_path, hypervisor(LIVE_USAGE))
    with open(drv.hypervisor.config_path(drv.vmdir)) as f:
        assert 'memory.wired=true' in f.read()
    data = _checks(drv)
    assert data.is_shared_instance_path and not data.block_migration


def test_unwired_vm_and_bandwidth_cap_are_refused(tmp_path):
    drv = _Drv(tmp_path, hypervisor(LIVE_USAGE))
    with pytest.raises(exception.MigrationPreCheckError,
                       match='wired guest memory'):
        _checks(drv)
    CONF.set_override('bhyve_wired_memory', True, group='bhyve')
    drv = _Drv(tmp_path, hypervisor(LIVE_USAGE))
    CONF.set_override('live_migration_bandwidth', 8, group='bhyve')
    with pytest.raises(exception.MigrationPreCheckError,
                       match='no bandwidth cap'):
        _checks(drv)


@pytest.fixture
def fake(tmp_path):
    f = Fake(tmp_path)
    yield f
    for pid in set(f.pids()):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def test_destination_starts_bhyve_receiving_then_finishes(fake):
    """prepare_incoming: the stand-in bhyve is started by the real
    supervisor as ``bhyve -k CONF -R ADDR,PORT``; finish_incoming accepts
    it running; the endpoint survives the JSON trip to the source."""
    CONF.set_override('bhyve_path', fake.bin, group='bhyve')
    CONF.set_override('bhyve_wired_memory', True, group='bhyve')
    hyp = hypervisor(LIVE_USAGE)
    fake.script('0 30')              # holds, as a bhyve waiting for -R
    with pytest.raises(NotImplementedError, match='moves memory only'):
        hyp.prepare_incoming(_spec(), fake.vmdir, '127.0.0.1', block=True)
    assert fake.runs() == []
    ep = hyp.prepare_incoming(_spec(), fake.vmdir, '127.0.0.1', block=False)
    fake.wait_runs(1)
    config = hyp.config_path(fake.vmdir)
    assert fake.runs()[0][1] == '-k %s -R 127.0.0.1,%d' % (config, ep.port)
    assert hyp.endpoint_from_json(ep.to_json()) == ep
    assert json.loads(ep.to_json()) == {'host': '127.0.0.1',
                                        'port': ep.port}
    hyp.finish_incoming(fake.vmdir)
    hyp.kill(fake.vmdir)
    with pytest.raises(base.HypervisorError, match='not running'):
        hyp.finish_incoming(fake.vmdir)


def test_ipv6_inbound_address_is_refused(fake):
    CONF.set_override('bhyve_path', fake.bin, group='bhyve')
    hyp = hypervisor(LIVE_USAGE)
    fake.script('0 30')
    with pytest.raises(base.HypervisorError, match='IPv4'):
        hyp.prepare_incoming(_spec(), fake.vmdir, '::1', block=False)


@pytest.fixture
def source(tmp_path):
    CONF.set_override('bhyve_wired_memory', True, group='bhyve')
    vmdir = base.VMDir(str(tmp_path / 'src' / UUID))
    os.makedirs(vmdir.path)
    bhyve_config.write_config(bhyve_config.render_config(_spec(), vmdir),
                       bhyve.BhyveHypervisor.config_path(vmdir))
    proc = subprocess.Popen([sys.executable, '-c',
                             'import time; time.sleep(60)', UUID])
    deadline = time.monotonic() + 10
    while not base.process_alive(proc.pid, UUID):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with open(vmdir.pidfile, 'w') as f:
        f.write(str(proc.pid))
    vmdir.proc = proc
    yield vmdir
    proc.kill()
    proc.wait()


def test_source_handle_through_the_orchestration_interface(source):
    hyp = hypervisor(LIVE_USAGE)
    ep = bm.Endpoint(host='10.0.0.2', port=49152)
    with pytest.raises(NotImplementedError, match='no bandwidth cap'):
        hyp.migrate_to(source, _spec(), ep, 8 * 1024 * 1024, None)
    h = hyp.migrate_to(source, _spec(), ep, 0, None)
    assert not h.reports_progress and not h.can_cancel
    h.start_mirror()
    assert h.mirror_ready()
    h.cancel()                        # nothing started yet: nothing to do
    with fake_execute.patch() as execute:
        h.start_memory()
    assert fake_execute.argvs(execute) == [[CONF.bhyve.bhyvectl_path,
                                            '--vm=%s' % NAME,
                                            '--migrate-live=10.0.0.2,49152']]
    assert h.poll().status == 'active'
    for kind, value in (('downtime', 500), ('throttle', 20),
                        ('postcopy', None), ('abort', None)):
        with pytest.raises(NotImplementedError):
            h.apply(mp.Step(kind, value, 'test'))
    with pytest.raises(NotImplementedError):
        h.force_complete()
    with pytest.raises(NotImplementedError, match='cannot cancel'):
        h.cancel()
    # the source bhyve exits 0 once migrated
    source.proc.kill()
    source.proc.wait()
    supervisor.write_exit_status(source.path, 0, 'migrated', supervisor.STOP)
    snap = h.poll()
    assert snap.status == 'completed' and snap.error is None
    h.finish()


def test_source_bhyve_failing_is_reported(source):
    hyp = hypervisor(LIVE_USAGE)
    h = hyp.migrate_to(source, _spec(), bm.Endpoint('10.0.0.2', 49152), 0,
                       None)
    with fake_execute.patch():
        h.start_memory()
    source.proc.kill()
    source.proc.wait()
    supervisor.write_exit_status(source.path, 4, 'error', supervisor.ERROR)
    snap = h.poll()
    assert snap.status == 'failed' and 'exited with status 4' in snap.error


def test_adopt_incoming_links_the_running_supervisor_files(tmp_path):
    vmdir = base.VMDir(str(tmp_path / UUID))
    runtime = base.VMDir(os.path.join(vmdir.path, 'in-6d5ba3a0'))
    os.makedirs(runtime.path)
    for name in (supervisor.VM_PIDFILE, 'console.log'):
        with open(os.path.join(runtime.path, name), 'w') as f:
            f.write(name)
    with open(os.path.join(vmdir.path, supervisor.VM_PIDFILE), 'w') as f:
        f.write('stale source pid')
    assert bhyve.BhyveHypervisor().adopt_incoming(runtime, vmdir) is False
    with open(vmdir.pidfile) as f:
        assert f.read() == supervisor.VM_PIDFILE
    assert os.readlink(vmdir.pidfile) == os.path.join(
        'in-6d5ba3a0', supervisor.VM_PIDFILE)
