"""hypervisor/bhyve/migration.py at its boundary.

bhyve(8) and bhyvectl(8) with the FreeBSD-UPB migration prototype cannot run
here (no FreeBSD, no vmm(4)), so ``processutils.execute`` is mocked for
bhyvectl only (its usage text and the --migrate request; fake_execute.py)
and the argv are pinned; the reading of the usage text also runs for real,
with a script standing in for bhyvectl.
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
from nova_bhyve.hypervisor.bhyve import state as bhyve_state
from nova_bhyve.hypervisor.bhyve import supervisor
from nova_bhyve.migration import policy as mp

import fake_execute

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


def support(text):
    # bhyvectl prints its usage on stderr and exits 1 for --help
    with fake_execute.patch(rc=1, err=text) as execute:
        result = bm.detect_support('/usr/sbin/bhyvectl')
    assert fake_execute.argvs(execute) == [['/usr/sbin/bhyvectl', '--help']]
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
    assert not bm.detect_support('/nonexistent/bhyvectl').warm
    with mock.patch.object(bhyve_state.processutils, 'execute',
                           side_effect=OSError(13, 'x')):
        assert not bm.detect_support('/usr/sbin/bhyvectl').warm


def _script(tmp_path, body):
    path = tmp_path / 'bhyvectl'
    path.write_text('#!/bin/sh\n' + body)
    path.chmod(0o755)
    return str(path)


def test_usage_text_of_a_real_command(tmp_path):
    # as bhyvectl: usage on stderr, exit status 1 (stdout is read too)
    usage = tmp_path / 'usage'
    usage.write_text(LIVE_USAGE)
    bhyvectl = _script(tmp_path, 'echo "out: $1"\ncat %s >&2\nexit 1\n'
                       % usage)
    assert bhyve_state.usage_text(bhyvectl) == 'out: --help\n' + LIVE_USAGE
    s = bm.detect_support(bhyvectl)
    assert (s.warm, s.live, s.separator) == (True, True, ',')


def test_usage_text_of_a_hanging_command_is_killed(tmp_path):
    pidfile = tmp_path / 'pid'
    bhyvectl = _script(tmp_path, 'echo $$ > %s\nexec sleep 60\n' % pidfile)
    t0 = time.monotonic()
    assert bhyve_state.usage_text(bhyvectl, timeout=0.5) == ''
    assert time.monotonic() - t0 < 10
    pid = int(pidfile.read_text())
    # killed and reaped: no such process any more
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


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
    s = support(WARM_USAGE)
    with fake_execute.patch() as execute:
        m = bm.BhyveMigration.start(hv, s, source,
                                    '192.0.2.20', 24983, live=False)
    assert fake_execute.argvs(execute) == [[
        '/usr/sbin/bhyvectl', '--vm=%s' % NAME,
        '--migrate=192.0.2.20,24983']]
    assert m.wait(timeout=10) is True and m.done


def test_bhyvectl_failure_is_reported(source):
    hv = bhyve.BhyveHypervisor()
    source.run_bhyve(30)
    s = support(WARM_USAGE)
    with fake_execute.patch(rc=255, err='Failed to send message to '
                            'bhyve vm'):
        with pytest.raises(base.HypervisorError, match='Failed to send'):
            bm.BhyveMigration.start(hv, s, source,
                                    '192.0.2.20', 24983, live=False)


def test_live_migration_of_an_unwired_vm_is_refused_before_bhyvectl(source):
    hv = bhyve.BhyveHypervisor()
    source.run_bhyve(30)
    s = support(LIVE_USAGE)
    with fake_execute.patch() as execute:
        with pytest.raises(NotImplementedError, match='wired'):
            bm.BhyveMigration.start(hv, s, source, '192.0.2.20', 24983,
                                    live=True)
    execute.assert_not_called()


def test_no_bhyve_process_is_an_error(source):
    s = support(WARM_USAGE)
    with fake_execute.patch() as execute:
        with pytest.raises(base.HypervisorError, match='no bhyve process'):
            bm.BhyveMigration.start(bhyve.BhyveHypervisor(), s, source,
                                    '192.0.2.20', 24983, live=False)
    execute.assert_not_called()


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
