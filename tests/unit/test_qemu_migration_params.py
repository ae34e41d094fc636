"""hypervisor/qemu/migration_params.py: the commands are pinned, and every
one is sent to a real QEMU (``qemu-system-x86_64 -machine none``, no guest,
no accelerator needed) through nova_bhyve.hypervisor.qemu.qmp, which proves
QEMU 7.2's QMP schema accepts each command and argument;
query-migrate-parameters
/ -capabilities then show they took effect. Nothing is mocked."""
import os
import shutil
import subprocess
import tempfile
import time

import pytest

from nova_bhyve.hypervisor.qemu import migration_params as qmp_params
from nova_bhyve.hypervisor.qemu import qmp
from nova_bhyve.migration import policy as mp

QEMU = shutil.which('qemu-system-x86_64')
MiB = mp.MiB


def policy(fallback):
    return mp.ConvergencePolicy(50, 500, 5, fallback, 800)


def test_initial_commands_auto_converge():
    cmds = qmp_params.initial_qmp(policy('auto-converge'), 100 * MiB)
    assert cmds == [
        ('migrate-set-capabilities', {'capabilities': [
            {'capability': 'events', 'state': True},
            {'capability': 'postcopy-ram', 'state': False},
            {'capability': 'auto-converge', 'state': True}]}),
        ('migrate-set-parameters', {
            'downtime-limit': 50, 'max-bandwidth': 100 * MiB,
            'cpu-throttle-initial': 1, 'max-cpu-throttle': 1,
            'cpu-throttle-increment': 1, 'cpu-throttle-tailslow': False})]


def test_initial_commands_post_copy_without_cap():
    caps, params = qmp_params.initial_qmp(policy('post-copy'), 0)
    assert {'capability': 'postcopy-ram', 'state': True} in \
        caps[1]['capabilities']
    assert {'capability': 'auto-converge', 'state': False} in \
        caps[1]['capabilities']
    assert params == ('migrate-set-parameters', {
        'downtime-limit': 50, 'max-bandwidth': qmp_params.UNLIMITED_BANDWIDTH,
        'max-postcopy-bandwidth': 0})
    # the destination: the same, and its disks taken only at 'cont'
    (incoming,) = qmp_params.incoming_qmp(policy('post-copy'))
    assert incoming[1]['capabilities'] == caps[1]['capabilities'] + [
        {'capability': 'late-block-activate', 'state': True}]
    (incoming,) = qmp_params.incoming_qmp(None)
    assert {'capability': 'late-block-activate', 'state': True} in \
        incoming[1]['capabilities']
    assert {'capability': 'postcopy-ram', 'state': False} in \
        incoming[1]['capabilities']


def test_step_commands():
    S = mp.Step
    assert qmp_params.qmp_for_step(S('downtime', 410, '')) == [
        ('migrate-set-parameters', {'downtime-limit': 410})]
    assert qmp_params.qmp_for_step(S('throttle', 40, '')) == [
        ('migrate-set-parameters', {
            'cpu-throttle-initial': 40, 'max-cpu-throttle': 40,
            'cpu-throttle-increment': 99, 'throttle-trigger-threshold': 1})]
    assert qmp_params.qmp_for_step(S('postcopy', None, '')) == [
        ('migrate-start-postcopy', {})]
    assert qmp_params.qmp_for_step(S('abort', None, '')) == [
        ('migrate_cancel', {})]
    with pytest.raises(ValueError, match='unknown migration step'):
        qmp_params.qmp_for_step(S('pause', None, ''))
    with pytest.raises(ValueError, match='1..99'):
        qmp_params.qmp_for_step(S('throttle', 100, ''))


@pytest.fixture
def qemu_monitor():
    if QEMU is None:
        pytest.skip('qemu-system-x86_64 not installed (tools/setup-host)')
    tmp = tempfile.mkdtemp(prefix='nb-mig-')
    path = os.path.join(tmp, 'qmp.sock')
    proc = subprocess.Popen(
        [QEMU, '-machine', 'none', '-nodefaults', '-display', 'none',
         '-qmp', 'unix:%s,server=on,wait=off' % path],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, 'no QMP socket'
            time.sleep(0.05)
        yield path
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
        shutil.rmtree(tmp)


def _run(path, commands):
    for name, args in commands:
        qmp.execute(path, name, args)


def _params(path):
    return qmp.execute(path, 'query-migrate-parameters')


def _caps(path):
    return {c['capability']: c['state']
            for c in qmp.execute(path, 'query-migrate-capabilities')}


def test_qemu_accepts_the_auto_converge_mapping(qemu_monitor):
    p = policy('auto-converge')
    _run(qemu_monitor, qmp_params.initial_qmp(p, 100 * MiB))
    caps = _caps(qemu_monitor)
    assert caps['events'] and caps['auto-converge']
    assert not caps['postcopy-ram']
    params = _params(qemu_monitor)
    assert params['downtime-limit'] == 50
    assert params['max-bandwidth'] == 100 * MiB
    assert params['max-cpu-throttle'] == params['cpu-throttle-initial'] == 1
    for step in (mp.Step('downtime', 410, ''), mp.Step('throttle', 20, ''),
                 mp.Step('throttle', 99, ''), mp.Step('downtime', 500, '')):
        _run(qemu_monitor, qmp_params.qmp_for_step(step))
    params = _params(qemu_monitor)
    assert params['downtime-limit'] == 500
    assert params['cpu-throttle-initial'] == params['max-cpu-throttle'] == 99
    assert params['cpu-throttle-increment'] == 99
    assert params['throttle-trigger-threshold'] == 1
    # abort with no migration running: accepted, nothing to cancel
    _run(qemu_monitor, qmp_params.qmp_for_step(mp.Step('abort', None, '')))


def test_qemu_accepts_the_post_copy_mapping(qemu_monitor):
    p = policy('post-copy')
    _run(qemu_monitor, qmp_params.initial_qmp(p, 0))
    assert _caps(qemu_monitor)['postcopy-ram']
    params = _params(qemu_monitor)
    assert params['max-bandwidth'] == qmp_params.UNLIMITED_BANDWIDTH
    assert params['max-postcopy-bandwidth'] == 0
    _run(qemu_monitor, qmp_params.incoming_qmp(p))
    assert _caps(qemu_monitor)['late-block-activate']
    # The schema accepts migrate-start-postcopy; with no migration running
    # QEMU refuses it for that reason only (with postcopy-ram off it would
    # say to enable the capability first).
    with pytest.raises(qmp.QMPError) as e:
        _run(qemu_monitor,
             qmp_params.qmp_for_step(mp.Step('postcopy', None, '')))
    assert e.value.error_class == 'GenericError'
    assert 'migration has been started' in str(e.value)
