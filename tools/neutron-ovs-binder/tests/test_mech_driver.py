"""The Neutron glue (mech_driver.py, worker.py) in Neutron's own ML2 test
harness (sqlite, the real Ml2Plugin with ``mechanism_drivers = bhyve_ovs``,
loaded through its entry point: install the package first). Run with
Neutron's Python: ``python -m pytest tools/neutron-ovs-binder/tests``."""
import os
import shutil
import signal
import subprocess
import tempfile
import time
from unittest import mock

import pytest

pytest.importorskip('neutron')  # run with Neutron's Python

from neutron import service as neutron_service
from neutron.tests.unit.plugins.ml2 import test_plugin
from neutron_lib import constants
from neutron_lib import context
from neutron_lib.api.definitions import portbindings
from neutron_lib.plugins import directory
from oslo_config import cfg
import testtools

from nova_bhyve_ovs_binder import mech_driver
from nova_bhyve_ovs_binder import worker

HOST = 'compute-1'
DEVICE = '8c1d2f3e-4a5b-4c6d-8e7f-9a0b1c2d3e4f'


class _ML2Base(test_plugin.Ml2PluginV2TestCase):

    _mechanism_drivers = ['bhyve_ovs']

    def setup_coreplugin(self, *args, **kwargs):
        # the harness turns Nova's notifier off; the events are the point
        cfg.CONF.set_override('notify_nova_on_port_status_changes', True)
        super().setup_coreplugin(*args, **kwargs)

    def setUp(self):
        super().setUp()
        self.plugin = directory.get_plugin()
        self.ctx = context.get_admin_context()
        self.mech = self.plugin.mechanism_manager.mech_drivers[
            'bhyve_ovs'].obj
        self.reporter = mech_driver.PortStatusReporter(self.mech)
        self.nova_events = []
        queue = mock.patch.object(
            self.plugin.nova_notifier.batch_notifier, 'queue_event',
            side_effect=lambda e: e and self.nova_events.append(e))
        queue.start()
        self.addCleanup(queue.stop)

    def _port(self, host=HOST, **kwargs):
        net = self._make_network(self.fmt, 'net', True, as_admin=True)
        args = {portbindings.HOST_ID: host,
                'device_owner': 'compute:nova', 'device_id': DEVICE}
        args.update(kwargs)
        port = self._make_port(
            self.fmt, net['network']['id'], as_admin=True,
            arg_list=tuple(args), **args)
        return port['port']

    def _status(self, port_id):
        return self.plugin.get_port(self.ctx, port_id)['status']

    def _events(self):
        return [(e['name'], e['tag'], e['status']) for e in self.nova_events]



class BhyveOVSTestCase(_ML2Base):

    def test_binding(self):
        port = self._port()
        self.assertEqual(portbindings.VIF_TYPE_OVS,
                         port[portbindings.VIF_TYPE])
        self.assertEqual({'port_filter': False,
                          'ovs_hybrid_plug': False,
                          'bridge_name': 'br-int',
                          'datapath_type': 'netdev',
                          'connectivity': 'l2',
                          'bound_drivers': {'0': 'bhyve_ovs'}},
                         port[portbindings.VIF_DETAILS])
        # DOWN until its interface shows
        self.assertEqual(constants.PORT_STATUS_DOWN, port['status'])

    def test_bridge_from_config(self):
        cfg.CONF.set_override('bridge_name', 'br-test', group='ovs_binder')
        self.mech.initialize()
        port = self._port()
        self.assertEqual(
            'br-test',
            port[portbindings.VIF_DETAILS][portbindings.
                                           VIF_DETAILS_BRIDGE_NAME])

    def test_no_host_no_binding(self):
        port = self._port(host='')
        self.assertEqual(portbindings.VIF_TYPE_UNBOUND,
                         port[portbindings.VIF_TYPE])

    def test_other_vnic_types_not_bound(self):
        port = self._port(**{portbindings.VNIC_TYPE: 'direct'})
        self.assertEqual(portbindings.VIF_TYPE_BINDING_FAILED,
                         port[portbindings.VIF_TYPE])

    def test_plugged_unplugged(self):
        port = self._port()
        self.reporter.plugged(port['id'])
        self.assertEqual(constants.PORT_STATUS_ACTIVE,
                         self._status(port['id']))
        self.reporter.plugged(port['id'])       # again: nothing new
        self.reporter.unplugged(port['id'])
        self.assertEqual(constants.PORT_STATUS_DOWN,
                         self._status(port['id']))
        self.reporter.unplugged(port['id'])
        self.assertEqual(
            [('network-vif-plugged', port['id'], 'completed'),
             ('network-vif-unplugged', port['id'], 'completed')],
            self._events())

    def test_ports_not_ours_left_alone(self):
        unbound = self._port(host='')
        self.reporter.plugged(unbound['id'])
        self.assertEqual(constants.PORT_STATUS_DOWN,
                         self._status(unbound['id']))
        # not a port, not a UUID: ignored
        self.reporter.plugged('5b1cc0a4-0d1e-4f43-9b0e-6a6f1c2d3e01')
        self.reporter.plugged('tap-something')
        self.reporter.unplugged('tap-something')
        self.assertEqual([], self._events())

    def test_synced(self):
        plugged = self._port()
        gone = self._port()
        self.reporter.plugged(gone['id'])
        self.nova_events.clear()
        self.reporter.synced(frozenset([plugged['id'], 'not-a-port']))
        self.assertEqual(constants.PORT_STATUS_ACTIVE,
                         self._status(plugged['id']))
        self.assertEqual(constants.PORT_STATUS_DOWN,
                         self._status(gone['id']))
        self.assertEqual(
            sorted([('network-vif-plugged', plugged['id'], 'completed'),
                    ('network-vif-unplugged', gone['id'], 'completed')]),
            sorted(self._events()))
        self.nova_events.clear()
        self.reporter.synced(frozenset([plugged['id']]))
        self.assertEqual([], self._events())

    def test_rebinding_sets_down_until_plugged_again(self):
        port = self._port()
        self.reporter.plugged(port['id'])
        self._update('ports', port['id'],
                     {'port': {portbindings.HOST_ID: 'compute-2'}},
                     as_admin=True)
        self.assertEqual(constants.PORT_STATUS_DOWN,
                         self._status(port['id']))
        self.reporter.plugged(port['id'])
        self.assertEqual(constants.PORT_STATUS_ACTIVE,
                         self._status(port['id']))

    def test_worker_runs_only_in_periodic_workers(self):
        ours = [w for w in self.plugin.get_workers()
                if isinstance(w, worker.WatcherWorker)]
        self.assertEqual(1, len(ours))
        self.assertEqual(0, ours[0].worker_process_count)
        # neutron-periodic-workers groups it with the other thread workers
        prepared = neutron_service._prepare_periodic_workers(
            neutron_service._get_plugins_workers())
        grouped = [s for p in prepared
                   for s in getattr(p, '_services', [p])]
        self.assertIn(ours[0], grouped)

    def test_worker_start_stop(self):
        watcher = mock.Mock()
        with mock.patch.object(mech_driver.ovsdb_watch, 'InterfaceWatcher',
                               return_value=watcher) as cls:
            cfg.CONF.set_override('ovsdb_connection', 'unix:/x/db.sock',
                                  group='ovs_binder')
            w = self.mech.get_workers()[0]
            w.start()
            w.start()               # started once
            w.wait()
            w.stop()
        cls.assert_called_once_with(
            'unix:/x/db.sock', mock.ANY, require_ofport=True,
            resync_interval=30)
        self.assertIs(self.mech, cls.call_args[0][1].driver)
        self.assertEqual([mock.call.start(), mock.call.wait(),
                          mock.call.stop()], watcher.mock_calls)


class OVSDBServer:
    """A private ovsdb-server (no ovs-vswitchd) in a temp dir."""

    SCHEMA = '/usr/share/openvswitch/vswitch.ovsschema'

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix='nbobm-', dir='/tmp')
        self.remote = 'unix:%s/db.sock' % self.dir
        db = os.path.join(self.dir, 'conf.db')
        subprocess.run(['ovsdb-tool', 'create', db, self.SCHEMA], check=True)
        subprocess.run(
            ['ovsdb-server', db, '--remote=punix:%s/db.sock' % self.dir,
             '--pidfile=%s/pid' % self.dir, '--detach',
             '--unixctl=%s/ctl' % self.dir,
             '--log-file=%s/log' % self.dir], check=True)
        with open('%s/pid' % self.dir) as f:
            self.pid = int(f.read())

    def vsctl(self, *args):
        subprocess.run(['ovs-vsctl', '--db=' + self.remote, '--no-wait',
                        '--timeout=20'] + list(args), check=True)

    def cleanup(self):
        os.kill(self.pid, signal.SIGTERM)
        for _ in range(500):
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.02)
        shutil.rmtree(self.dir, ignore_errors=True)


@testtools.skipUnless(shutil.which('ovsdb-server') and
                      os.path.exists(OVSDBServer.SCHEMA),
                      'Open vSwitch not installed')
class WatcherEndToEndTestCase(_ML2Base):
    """The worker's real watcher on a private ovsdb-server: an interface
    with the port's iface-id makes it ACTIVE, its removal DOWN."""

    def _wait_status(self, port_id, status):
        deadline = time.monotonic() + 20
        while self._status(port_id) != status:
            self.assertLess(time.monotonic(), deadline,
                            'port %s never %s' % (port_id, status))
            time.sleep(0.05)

    def _wait_events(self, count):
        # queued by the watcher's thread once its transaction is over
        deadline = time.monotonic() + 20
        while len(self.nova_events) < count:
            self.assertLess(time.monotonic(), deadline, self._events())
            time.sleep(0.05)

    def test_interface_appearing_and_going(self):
        ovsdb = OVSDBServer()
        self.addCleanup(ovsdb.cleanup)
        ovsdb.vsctl('init')
        ovsdb.vsctl('add-br', 'br-int')
        cfg.CONF.set_override('ovsdb_connection', ovsdb.remote,
                              group='ovs_binder')
        cfg.CONF.set_override('require_ofport', False, group='ovs_binder')
        w = self.mech.get_workers()[0]
        port = self._port()
        w.start()
        self.addCleanup(w.stop)
        ovsdb.vsctl('add-port', 'br-int', 'tap1', '--', 'set', 'Interface',
                    'tap1', 'type=internal',
                    'external_ids:iface-id=%s' % port['id'])
        self._wait_status(port['id'], constants.PORT_STATUS_ACTIVE)
        self._wait_events(1)
        ovsdb.vsctl('del-port', 'br-int', 'tap1')
        self._wait_status(port['id'], constants.PORT_STATUS_DOWN)
        self._wait_events(2)
        self.assertEqual(
            [('network-vif-plugged', port['id'], 'completed'),
             ('network-vif-unplugged', port['id'], 'completed')],
            self._events())


def test_the_source_tree_is_tested():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert mech_driver.__file__.startswith(here + os.sep)
