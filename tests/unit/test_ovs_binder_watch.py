"""tools/neutron-ovs-binder's OVSDB watcher (ovsdb_watch.py, no Neutron)
against a real private ovsdb-server (no ovs-vswitchd: ofport stays empty
unless a test writes it): interfaces with an iface-id appearing and going,
the ofport rule, a handler that fails, periodic resyncs, an ovsdb-server
restart (same database: nothing reported; an empty one: the port gone) and
a clean stop."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

sys.path.insert(0, os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), 'tools', 'neutron-ovs-binder'))

from nova_bhyve_ovs_binder import ovsdb_watch  # noqa: E402

SCHEMA = '/usr/share/openvswitch/vswitch.ovsschema'

pytestmark = pytest.mark.skipif(
    not (shutil.which('ovsdb-server') and shutil.which('ovs-vsctl') and
         os.path.exists(SCHEMA)),
    reason='Open vSwitch (ovsdb-server, ovs-vsctl, its schema) not '
           'installed')

PORT_A = '5b1cc0a4-0d1e-4f43-9b0e-6a6f1c2d3e01'
PORT_B = '5b1cc0a4-0d1e-4f43-9b0e-6a6f1c2d3e02'


class OVSDB:
    """A private ovsdb-server in a temp dir, stopped by its PID."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix='nbobw-', dir='/tmp')
        self.remote = 'unix:%s/db.sock' % self.dir
        self.env = dict(os.environ, OVS_RUNDIR=self.dir,
                        OVS_LOGDIR=self.dir, OVS_DBDIR=self.dir)
        self.pid = None
        self.create('conf.db')

    def create(self, name):
        self.db = os.path.join(self.dir, name)
        subprocess.run(['ovsdb-tool', 'create', self.db, SCHEMA],
                       check=True, env=self.env)

    def start(self):
        subprocess.run(
            ['ovsdb-server', self.db, '--remote=punix:%s/db.sock' % self.dir,
             '--pidfile=%s/ovsdb-server.pid' % self.dir, '--detach',
             '--unixctl=%s/ovsdb-server.ctl' % self.dir,
             '--log-file=%s/ovsdb-server.log' % self.dir],
            check=True, env=self.env)
        with open('%s/ovsdb-server.pid' % self.dir) as f:
            self.pid = int(f.read().strip())
        self.vsctl('init')

    def stop(self):
        if self.pid is None:
            return
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.02)
        else:
            os.kill(self.pid, signal.SIGKILL)
        self.pid = None

    def vsctl(self, *args):
        return subprocess.run(
            ['ovs-vsctl', '--db=' + self.remote, '--no-wait',
             '--timeout=20'] + list(args),
            check=True, env=self.env, capture_output=True, text=True).stdout

    def add_port(self, bridge, name, port_id=None):
        cmd = ['--may-exist', 'add-port', bridge, name, '--', 'set',
               'Interface', name, 'type=internal']
        if port_id:
            cmd.append('external_ids:iface-id=%s' % port_id)
        self.vsctl(*cmd)

    def set_ofport(self, name, ofport):
        """What ovs-vswitchd does once it has attached the interface."""
        txn = ['Open_vSwitch',
               {'op': 'update', 'table': 'Interface',
                'where': [['name', '==', name]],
                'row': {'ofport': ofport}}]
        out = subprocess.run(
            ['ovsdb-client', 'transact', self.remote, json.dumps(txn)],
            check=True, env=self.env, capture_output=True, text=True).stdout
        assert json.loads(out)[0].get('count') == 1, out

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Recorder:
    """A handler keeping what it was told, in order."""

    def __init__(self):
        self.events = []
        self.fail = {}              # call name -> failures left
        self._cond = threading.Condition()

    def _record(self, name, arg):
        with self._cond:
            if self.fail.get(name):
                self.fail[name] -= 1
                self.events.append(('failed-' + name, arg))
                self._cond.notify_all()
                raise RuntimeError('%s(%s) fails on purpose' % (name, arg))
            self.events.append((name, arg))
            self._cond.notify_all()

    def plugged(self, port_id):
        self._record('plugged', port_id)

    def unplugged(self, port_id):
        self._record('unplugged', port_id)

    def synced(self, port_ids):
        self._record('synced', frozenset(port_ids))

    def wait_for(self, event, count=1, timeout=20):
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self.events.count(event) >= count, timeout)
        assert ok, 'no %r (x%d) in %s' % (event, count, self.events)

    def of(self, name):
        return [arg for n, arg in self.events if n == name]


@pytest.fixture
def ovsdb():
    db = OVSDB()
    try:
        db.start()
        db.vsctl('add-br', 'br-x', '--', 'set', 'Bridge', 'br-x',
                 'datapath_type=netdev')
        yield db
    finally:
        db.cleanup()


@pytest.fixture
def watch(ovsdb):
    started = []

    def start(**kwargs):
        kwargs.setdefault('require_ofport', False)
        kwargs.setdefault('resync_interval', 0)
        handler = Recorder()
        watcher = ovsdb_watch.InterfaceWatcher(ovsdb.remote, handler,
                                               **kwargs)
        started.append(watcher)
        watcher.start()
        return watcher, handler

    yield start
    for watcher in started:
        watcher.stop()


def _quiet(handler, seconds=0.5):
    """What the handler was told, after a while without news."""
    time.sleep(seconds)
    return list(handler.events)


def test_interfaces_appearing_and_going(ovsdb, watch):
    ovsdb.add_port('br-x', 'tapa1', PORT_A)
    watcher, handler = watch()
    # the ports already there: reported, then the whole set
    handler.wait_for(('synced', frozenset([PORT_A])))
    assert handler.events == [('plugged', PORT_A),
                              ('synced', frozenset([PORT_A]))]

    ovsdb.add_port('br-x', 'tapb1', PORT_B)
    handler.wait_for(('plugged', PORT_B))
    # no iface-id: not a Neutron port; a second interface for a port
    # already present (a migration on one host): nothing new
    ovsdb.add_port('br-x', 'tapx')
    ovsdb.add_port('br-x', 'tapa2', PORT_A)
    ovsdb.vsctl('del-port', 'br-x', 'tapa1')
    assert _quiet(handler)[2:] == [('plugged', PORT_B)]
    assert watcher.present == frozenset([PORT_A, PORT_B])

    ovsdb.vsctl('del-port', 'br-x', 'tapa2')
    handler.wait_for(('unplugged', PORT_A))
    # the iface-id removed from an interface still there: gone too
    ovsdb.vsctl('remove', 'Interface', 'tapb1', 'external_ids',
                'iface-id')
    handler.wait_for(('unplugged', PORT_B))
    assert watcher.present == frozenset()
    assert handler.events[2:] == [('plugged', PORT_B),
                                  ('unplugged', PORT_A),
                                  ('unplugged', PORT_B)]


def test_ofport_required(ovsdb, watch):
    watcher, handler = watch(require_ofport=True)
    handler.wait_for(('synced', frozenset()))
    ovsdb.add_port('br-x', 'tapa1', PORT_A)
    # ovs-vswitchd has not attached it (no ofport): not yet plugged
    assert _quiet(handler) == [('synced', frozenset())]
    ovsdb.set_ofport('tapa1', -1)       # it failed to
    assert _quiet(handler) == [('synced', frozenset())]
    ovsdb.set_ofport('tapa1', 7)
    handler.wait_for(('plugged', PORT_A))
    ovsdb.vsctl('del-port', 'br-x', 'tapa1')
    handler.wait_for(('unplugged', PORT_A))


def test_failed_reports_are_tried_again(ovsdb, watch):
    watcher, handler = watch(retry_interval=0.2)
    handler.fail = {'synced': 1, 'plugged': 2}
    handler.wait_for(('synced', frozenset()))
    ovsdb.add_port('br-x', 'tapa1', PORT_A)
    handler.wait_for(('plugged', PORT_A))
    assert handler.events == [
        ('failed-synced', frozenset()), ('synced', frozenset()),
        ('failed-plugged', PORT_A), ('failed-plugged', PORT_A),
        ('plugged', PORT_A)]
    # an unplug while the plug report still fails: only the latest state
    handler.fail = {'plugged': 1, 'unplugged': 1}
    ovsdb.add_port('br-x', 'tapb1', PORT_B)
    handler.wait_for(('failed-plugged', PORT_B))
    ovsdb.vsctl('del-port', 'br-x', 'tapb1')
    handler.wait_for(('unplugged', PORT_B))
    assert _quiet(handler)[5:] == [
        ('failed-plugged', PORT_B), ('failed-unplugged', PORT_B),
        ('unplugged', PORT_B)]


def test_periodic_resync(ovsdb, watch):
    ovsdb.add_port('br-x', 'tapa1', PORT_A)
    watcher, handler = watch(resync_interval=0.3)
    handler.wait_for(('synced', frozenset([PORT_A])), count=3, timeout=5)
    assert handler.of('plugged') == [PORT_A]


def test_ovsdb_server_restart(ovsdb, watch):
    ovsdb.add_port('br-x', 'tapa1', PORT_A)
    watcher, handler = watch()
    handler.wait_for(('synced', frozenset([PORT_A])))

    # the same database back: a new snapshot, nothing changed
    ovsdb.stop()
    time.sleep(0.3)
    ovsdb.start()
    handler.wait_for(('synced', frozenset([PORT_A])), count=2)
    assert handler.events == [('plugged', PORT_A),
                              ('synced', frozenset([PORT_A])),
                              ('synced', frozenset([PORT_A]))]
    ovsdb.add_port('br-x', 'tapb1', PORT_B)
    handler.wait_for(('plugged', PORT_B))

    # an empty database back: what went while away is reported
    ovsdb.stop()
    ovsdb.create('conf2.db')
    ovsdb.start()
    handler.wait_for(('synced', frozenset()))
    assert handler.events[3:] == [('plugged', PORT_B),
                                  ('unplugged', PORT_A),
                                  ('unplugged', PORT_B),
                                  ('synced', frozenset())]
    ovsdb.vsctl('add-br', 'br-y')
    ovsdb.add_port('br-y', 'tapa1', PORT_A)
    handler.wait_for(('plugged', PORT_A), count=2)


def test_watcher_started_before_the_server(ovsdb, watch):
    ovsdb.stop()
    watcher, handler = watch()
    time.sleep(0.5)
    assert handler.events == []
    ovsdb.start()
    handler.wait_for(('synced', frozenset()))


def test_stop(ovsdb, watch):
    watcher, handler = watch()
    handler.wait_for(('synced', frozenset()))
    thread = watcher._thread
    started = time.monotonic()
    watcher.stop()
    assert time.monotonic() - started < 2
    assert not thread.is_alive()
    watcher.stop()                  # twice: nothing more to do
    # the server saw the connection go and still serves
    ovsdb.add_port('br-x', 'tapa1', PORT_A)
    assert _quiet(handler, 0.3) == [('synced', frozenset())]


def test_unexpected_error_starts_over(ovsdb, watch, monkeypatch):
    real = ovsdb_watch._interface_port_ids
    calls = []

    def fails_once(idl, require_ofport):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError('a bug, once')
        return real(idl, require_ofport)

    monkeypatch.setattr(ovsdb_watch, '_interface_port_ids', fails_once)
    ovsdb.add_port('br-x', 'tapa1', PORT_A)
    watcher, handler = watch(retry_interval=0.2)
    # a new connection, a new snapshot
    handler.wait_for(('synced', frozenset([PORT_A])))
    assert handler.events == [('plugged', PORT_A),
                              ('synced', frozenset([PORT_A]))]
