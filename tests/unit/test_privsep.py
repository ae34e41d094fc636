"""The privileged boundary: nova_bhyve.privsep.net through both transports.

The argument checks run with the platform's device commands mocked (nothing
must reach them). The transports run for real: the oslo.privsep daemon is
forked from this (root) process - an unprivileged nova-compute starts the
same daemon through privsep-helper and rootwrap, which needs a non-root
user and is not run here - and keeps only its two capabilities, and
the FreeBSD-style one-shot helper runs as a real subprocess (with Linux's
device commands: the helper itself is platform-neutral). Both create and
delete a real tap with a name unique to the test, and remove it at the end.
"""
import os
import shlex
import sys
from unittest import mock
import uuid

from oslo_privsep import capabilities as caps
from oslo_privsep import priv_context
import pytest

from nova_bhyve import conf
from nova_bhyve import privsep
from nova_bhyve.cmd import privhelper
from nova_bhyve.privsep import net as privileged

CONF = conf.CONF
MAC = 'fa:16:3e:aa:bb:cc'
VM = '0b3b2a8e-6a4e-4a3b-9f51-7d1c7e2a9c10'


def _unwrapped(name):
    return privsep.ENTRYPOINTS[name]


@pytest.mark.parametrize('name,args', [
    ('create_tap', ('eth0', MAC, 1500, None)),          # not a tap
    ('create_tap', ('tap;reboot', MAC, 1500, None)),
    ('create_tap', ('tap-with-a-very-long-name', MAC, 1500, None)),
    ('create_tap', ('tapok', 'fa:16:3e:aa:bb', 1500, None)),
    ('create_tap', ('tapok', MAC, 10, None)),
    ('create_tap', ('tapok', MAC, '1500', None)),
    ('create_tap', ('tapok', MAC, 1500, -1)),
    ('delete_tap', ('eth0',)),
    ('delete_tap', ('../tap0',)),
    ('ensure_bridge', ('br 0',)),
    ('add_to_bridge', ('br0', 'qvo123')),
    ('add_ovs_port', ('br-int', 'tapok', 'id"; rm', MAC, VM, None)),
    ('add_ovs_port', ('br-int', 'tapok', 'port', MAC, 'not-a-uuid', None)),
    ('del_ovs_port', ('br-int', 'lo')),
])
def test_bad_arguments_are_refused_before_any_command(name, args):
    with mock.patch('nova_bhyve.privsep.net.platform') as platform:
        with pytest.raises(privsep.Refused):
            _unwrapped(name)(*args)
    assert platform.mock_calls == []


def test_good_arguments_reach_the_platform():
    with mock.patch('nova_bhyve.privsep.net.platform') as platform:
        _unwrapped('create_tap')('tapab12', 'FA:16:3E:AA:BB:CC', 1450, 1000)
        _unwrapped('add_ovs_port')('br-int', 'tapab12', 'port-id', MAC,
                                   VM.upper(), None)
    impl = platform.return_value
    impl.create_tap.assert_called_once_with('tapab12', MAC, 1450, owner=1000)
    impl.add_ovs_port.assert_called_once_with('br-int', 'tapab12', 'port-id',
                                              MAC, VM, None)


def test_every_entrypoint_is_registered_for_the_helper():
    assert set(privsep.ENTRYPOINTS) == {
        'create_tap', 'delete_tap', 'ensure_bridge', 'add_to_bridge',
        'add_ovs_port', 'del_ovs_port'}


# -- real transports (root here) -------------------------------------------

def _link(dev, attr):
    with open('/sys/class/net/%s/%s' % (dev, attr)) as f:
        return f.read().strip()


@pytest.fixture
def tap_name():
    name = 'tapnbp' + uuid.uuid4().hex[:8]
    yield name
    if os.path.exists('/sys/class/net/' + name):
        os.system('ip link del dev %s' % shlex.quote(name))


@pytest.fixture
def transport():
    def use(name, helper_command=None):
        CONF.set_override('privileged_transport', name, 'bhyve')
        if name == 'privsep':
            # what a non-root nova-compute gets, forked instead of started
            # through privsep-helper; calls go through it although we are
            # root
            privsep.net_admin.start(priv_context.Method.FORK)
            euid.start()
        if helper_command:
            CONF.set_override('privileged_helper_command', helper_command,
                              'bhyve')
    euid = mock.patch.object(privsep.os, 'geteuid', return_value=1000)
    yield use
    mock.patch.stopall()
    CONF.clear_override('privileged_transport', 'bhyve')
    CONF.clear_override('privileged_helper_command', 'bhyve')
    privsep.net_admin.stop()


def _check_tap_lifecycle(dev):
    privileged.create_tap(dev, MAC, 1400, 4242)
    assert _link(dev, 'address') == 'fe:16:3e:aa:bb:cc'
    assert _link(dev, 'mtu') == '1400'
    assert _link(dev, 'tun_flags')          # a tap, not another link type
    assert _link(dev, 'owner') == '4242'
    privileged.delete_tap(dev)
    assert not os.path.exists('/sys/class/net/' + dev)


def _daemon_pids():
    """Children of this process that are privsep daemons."""
    pids = []
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open('/proc/%s/status' % entry) as f:
                status = dict(line.split(':\t', 1) for line in f
                              if ':\t' in line)
        except OSError:
            continue
        if int(status.get('PPid', '0')) == os.getpid() and \
                int(status['CapEff'], 16) != int(
                    _own_status()['CapEff'], 16):
            pids.append((int(entry), int(status['CapEff'], 16)))
    return pids


def _own_status():
    with open('/proc/self/status') as f:
        return dict(line.split(':\t', 1) for line in f if ':\t' in line)


@pytest.mark.skipif(os.geteuid() != 0, reason='needs root to fork the '
                    'privsep daemon (CI runs as root)')
def test_privsep_daemon_creates_and_deletes_a_tap(transport, tap_name):
    transport('privsep')
    _check_tap_lifecycle(tap_name)
    daemons = _daemon_pids()
    assert len(daemons) == 1, daemons
    wanted = (1 << caps.CAP_NET_ADMIN) | (1 << caps.CAP_DAC_OVERRIDE)
    assert daemons[0][1] == wanted


@pytest.mark.skipif(os.geteuid() != 0, reason='needs root to fork the '
                    'privsep daemon (CI runs as root)')
def test_privsep_daemon_refusal_crosses_back(transport):
    transport('privsep')
    with pytest.raises(privsep.Refused, match='not a tap'):
        privileged.delete_tap('lo')
    assert os.path.exists('/sys/class/net/lo')


@pytest.mark.skipif(os.geteuid() != 0, reason='the helper runs as root '
                    'without sudo only when the test is root')
def test_helper_transport_creates_and_deletes_a_tap(transport, tap_name):
    helper = '%s -c %s' % (sys.executable, shlex.quote(
        'import sys; from nova_bhyve.cmd import privhelper; '
        'sys.exit(privhelper.main())'))
    transport('helper', helper)
    _check_tap_lifecycle(tap_name)
    with pytest.raises(privsep.Refused, match='not a tap'):
        privileged.delete_tap('lo')
    assert os.path.exists('/sys/class/net/lo')


def test_helper_refuses_unknown_functions_and_bad_json(capsys):
    assert privhelper.main(['system', '["ls"]']) == privsep.EXIT_REFUSED
    assert 'usage' in capsys.readouterr().err
    assert privhelper.main(['delete_tap', '{"a": 1}']) == \
        privsep.EXIT_REFUSED
    assert privhelper.main(['delete_tap', '[["tap0"]]']) == \
        privsep.EXIT_REFUSED
