"""hypervisor/bhyve/migration.py at its boundary.

bhyve(8) and bhyvectl(8) with the FreeBSD-UPB migration prototype cannot run
here (no FreeBSD, no vmm(4)), so ``subprocess.run`` is mocked for bhyvectl
only (its usage text and the --migrate request) and the argv are pinned.
The usage texts below are the prototype's (usr.sbin/bhyvectl/bhyvectl.c of
github.com/FreeBSD-UPB/freebsd-src, live-migration branch) and upstream's.
The source bhyve process is stood in for by a real short-lived process
whose command line carries the instance uuid (what base.process_alive
checks); each is stopped by its PID.
"""
import os
import subprocess
import sys
import time
from unittest import mock

import pytest

from nova_bhyve import conf
from nova_bhyve import guest
from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.bhyve import backend as bhyve
from nova_bhyve.hypervisor.bhyve import config as bhyve_config
from nova_bhyve.hypervisor.bhyve import migration as bm
from nova_bhyve.hypervisor.bhyve import supervisor
from nova_bhyve.migration import policy as mp

CONF = conf.CONF
UUID = '6d5ba3a0-55a1-4c7c-9a43-3d1b0f6a2b11'
NAME = 'instance-0000002a'

UPSTREAM_USAGE = ('Usage: bhyvectl --vm=<vmname>\n'
                  '       [--cpu=<vcpu_number>]\n       [--create]\n'
                  '       [--destroy]\n       [--get-all]\n')
SNAPSHOT_USAGE = UPSTREAM_USAGE + ('       [--checkpoint=<filename>]\n'
                                   '       [--suspend=<filename>]\n')
WARM_USAGE = SNAPSHOT_USAGE + '       [--migrate=<host>,<port>]\n'
LIVE_USAGE = WARM_USAGE + '       [--migrate-live=<host,port>]\n'
COLON_USAGE = SNAPSHOT_USAGE + ('       [--migrate=<host>:<port>]\n'
                                '       [--migrate-live=<host>:<port>]\n')


@pytest.fixture(autouse=True)
def _conf():
    CONF.set_override('bhyve_path', '/usr/sbin/bhyve', group='bhyve')
    CONF.set_override('bhyvectl_path', '/usr/sbin/bhyvectl', group='bhyve')
    yield
    CONF.clear_override('bhyve_path', group='bhyve')
    CONF.clear_override('bhyvectl_path', group='bhyve')


def _usage(text, rc=1):
    # bhyvectl prints its usage on stderr and exits 1 for --help
    return subprocess.CompletedProcess([], rc, '', text)


def support(text):
    with mock.patch.object(bm.subprocess, 'run',
                           return_value=_usage(text)) as run:
        result = bm.detect_support('/usr/sbin/bhyvectl')
    assert run.call_args[0][0] == ['/usr/sbin/bhyvectl', '--help']
    return result


@pytest.mark.parametrize('text, warm, live, sep', [
    (UPSTREAM_USAGE, False, False, None),
    (SNAPSHOT_USAGE, False, False, None),
    (WARM_USAGE, True, False, ','),
    (LIVE_USAGE, True, True, ','),
    (COLON_USAGE, True, True, ':'),
    ('       [--migrate=<where>]\n', False, False, None),   # unknown form
])
def test_support_from_the_usage_text(text, warm, live, sep):
    s = support(text)
    assert (s.warm, s.live, s.separator) == (warm, live, sep)


def test_no_bhyvectl_means_no_support():
    with mock.patch.object(bm.subprocess, 'run', side_effect=OSError(2, 'x')):
        assert not bm.detect_support('/nonexistent/bhyvectl').warm


def test_destination_argv():
    hv = bhyve.BhyveHypervisor()
    assert bm.incoming_argv(hv, support(LIVE_USAGE), '/vms/x/bhyve.conf',
                            '192.0.2.10', 24983) == [
        '/usr/sbin/bhyve', '-k', '/vms/x/bhyve.conf',
        '-R', '192.0.2.10,24983']
    assert bm.incoming_argv(hv, support(COLON_USAGE), '/vms/x/bhyve.conf',
                            '192.0.2.10', 24983)[-1] == '192.0.2.10:24983'


@pytest.mark.parametrize('live, option', [(False, '--migrate'),
                                          (True, '--migrate-live')])
def test_source_argv(live, option):
    hv = bhyve.BhyveHypervisor()
    assert bm.migrate_argv(hv, support(LIVE_USAGE), NAME, '192.0.2.20',
                           24983, live) == [
        '/usr/sbin/bhyvectl', '--vm=%s' % NAME,
        '%s=192.0.2.20,24983' % option]


@pytest.mark.parametrize('host, match', [
    ('2001:db8::1', 'IPv4 only'),
    ('dest.example.org', 'needs an IPv4 address'),
])
def test_addresses_the_prototype_cannot_use_are_refused(host, match):
    hv = bhyve.BhyveHypervisor()
    with pytest.raises(base.HypervisorError, match=match):
        bm.migrate_argv(hv, support(LIVE_USAGE), NAME, host, 24983, True)


def test_bad_port_is_refused():
    with pytest.raises(base.HypervisorError, match='bad migration port'):
        bm.migrate_argv(bhyve.BhyveHypervisor(), support(LIVE_USAGE), NAME,
                        '192.0.2.20', 0, False)


def test_what_the_prototype_lacks_is_refused():
    wired = {'memory.wired': 'true'}
    with pytest.raises(NotImplementedError, match='without the migration'):
        bm.check_request(support(SNAPSHOT_USAGE), False)
    with pytest.raises(NotImplementedError, match='warm migration only'):
        bm.check_request(support(WARM_USAGE), True, config_tree=wired)
    with pytest.raises(NotImplementedError, match='no bandwidth cap'):
        bm.check_request(support(LIVE_USAGE), False, bandwidth_mibps=100)
    with pytest.raises(NotImplementedError, match='wired guest memory'):
        bm.check_request(support(LIVE_USAGE), True, config_tree={})
    bm.check_request(support(LIVE_USAGE), True, config_tree=wired)
    bm.check_request(support(WARM_USAGE), False, config_tree={})


@pytest.fixture
def source(tmp_path):
    """A VM dir with a bhyve config and a process standing in for bhyve."""
    vmdir = base.VMDir(str(tmp_path / UUID))
    os.makedirs(vmdir.path)
    s = guest.VMSpec(uuid=UUID, name=NAME, vcpus=1, memory_mb=256,
                     disks=[guest.Disk(path='/d/r', format='raw')], nics=[],
                     boot=guest.Boot())
    bhyve_config.write_config(bhyve_config.render_config(s, vmdir),
                       bhyve.BhyveHypervisor.config_path(vmdir))
    procs = []

    def run_bhyve(seconds):
        proc = subprocess.Popen(
            [sys.executable, '-c', 'import time; time.sleep(%s)' % seconds,
             UUID])
        procs.append(proc)
        deadline = time.monotonic() + 10      # until exec shows the uuid
        while not base.process_alive(proc.pid, UUID):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with open(vmdir.pidfile, 'w') as f:
            f.write(str(proc.pid))
        return proc

    vmdir.run_bhyve = run_bhyve
    yield vmdir
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_warm_migration_start_and_wait(source):
    hv = bhyve.BhyveHypervisor()
    source.run_bhyve(0.5)
    with mock.patch.object(bm.subprocess, 'run',
                           return_value=_usage('', rc=0)) as run:
        m = bm.BhyveMigration.start(hv, support(WARM_USAGE), source,
                                    '192.0.2.20', 24983, live=False)
    assert run.call_args[0][0] == ['/usr/sbin/bhyvectl', '--vm=%s' % NAME,
                                   '--migrate=192.0.2.20,24983']
    assert m.wait(timeout=10) is True and m.done


def test_bhyvectl_failure_is_reported(source):
    hv = bhyve.BhyveHypervisor()
    source.run_bhyve(30)
    with mock.patch.object(bm.subprocess, 'run',
                           return_value=_usage('Failed to send message to '
                                               'bhyve vm', rc=255)):
        with pytest.raises(base.HypervisorError, match='Failed to send'):
            bm.BhyveMigration.start(hv, support(WARM_USAGE), source,
                                    '192.0.2.20', 24983, live=False)


def test_live_migration_of_an_unwired_vm_is_refused_before_bhyvectl(source):
    hv = bhyve.BhyveHypervisor()
    source.run_bhyve(30)
    s = support(LIVE_USAGE)
    with mock.patch.object(bm.subprocess, 'run') as run:
        with pytest.raises(NotImplementedError, match='wired'):
            bm.BhyveMigration.start(hv, s, source, '192.0.2.20', 24983,
                                    live=True)
    run.assert_not_called()


def test_no_bhyve_process_is_an_error(source):
    with mock.patch.object(bm.subprocess, 'run') as run:
        with pytest.raises(base.HypervisorError, match='no bhyve process'):
            bm.BhyveMigration.start(bhyve.BhyveHypervisor(),
                                    support(WARM_USAGE), source,
                                    '192.0.2.20', 24983, live=False)
    run.assert_not_called()


def test_wait_times_out_with_a_clear_error(source):
    proc = source.run_bhyve(30)
    m = bm.BhyveMigration(bhyve.BhyveHypervisor(), source, proc.pid, None)
    with pytest.raises(base.HypervisorError, match='cannot be cancelled'):
        m.wait(timeout=0.6)
    assert not m.done


def test_bhyve_exiting_with_an_error_is_not_a_migration(source):
    proc = source.run_bhyve(0.2)
    supervisor.write_exit_status(source.path, 4, 'error', supervisor.ERROR)
    m = bm.BhyveMigration(bhyve.BhyveHypervisor(), source, proc.pid, None)
    with pytest.raises(base.HypervisorError, match='status 4'):
        m.wait(timeout=10)


@pytest.mark.parametrize('kind, match', [
    ('downtime', 'no downtime limit'),
    ('throttle', 'cannot throttle'),
    ('postcopy', 'no post-copy'),
    ('abort', 'cannot cancel'),
])
def test_no_policy_step_applies_on_bhyve(source, kind, match):
    m = bm.BhyveMigration(bhyve.BhyveHypervisor(), source, None, None)
    with pytest.raises(NotImplementedError, match=match):
        m.apply(mp.Step(kind, 100, ''))
    with pytest.raises(NotImplementedError, match='no progress'):
        m.progress()
    with pytest.raises(NotImplementedError, match='cannot cancel'):
        m.cancel()
