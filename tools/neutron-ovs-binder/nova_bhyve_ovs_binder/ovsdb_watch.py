"""Which Neutron ports have an Open vSwitch interface, followed live.

No Neutron here: this module only needs the ``ovs`` Python library (the
OVSDB IDL: a monitor stream that reconnects by itself after an
ovsdb-server restart and reloads the table).
"""
import logging
import os
import threading
import time

import ovs.db.idl
import ovs.poller

LOG = logging.getLogger(__name__)

# Only what is read: the server's own schema may have more (any version).
_SCHEMA = {
    'name': 'Open_vSwitch',
    'version': '0.0.0',
    'tables': {
        'Interface': {
            'columns': {
                'name': {'type': 'string'},
                'external_ids': {'type': {'key': 'string',
                                          'value': 'string',
                                          'min': 0, 'max': 'unlimited'}},
                'ofport': {'type': {'key': 'integer',
                                    'min': 0, 'max': 1}},
            },
        },
    },
}


def _interface_port_ids(idl, require_ofport):
    """{port id: number of interfaces} in the IDL's current snapshot."""
    found = {}
    for row in idl.tables['Interface'].rows.values():
        port_id = row.external_ids.get('iface-id')
        if not port_id:
            continue
        if require_ofport and not (row.ofport and row.ofport[0] > 0):
            continue
        found[port_id] = found.get(port_id, 0) + 1
    return found


class InterfaceWatcher:
    """Reports, from its own thread, to ``handler``:

    * ``handler.plugged(port_id)``: a port got its first Interface row with
      ``external_ids:iface-id=port_id`` (and, with ``require_ofport``, an
      OpenFlow port number > 0, i.e. ovs-vswitchd has really attached it);
    * ``handler.unplugged(port_id)``: its last such row went away;
    * ``handler.synced(port_ids)``: the whole set of port ids present, after
      each (re)connection's snapshot and every ``resync_interval`` seconds.

    The first snapshot is compared with an empty set (every port present is
    reported plugged); one after a reconnection with the last one seen, so
    what changed while ovsdb-server was away is reported too. A handler
    call that raises is logged and tried again ``retry_interval`` seconds
    later (with the port's latest state).
    """

    def __init__(self, remote, handler, require_ofport=True,
                 resync_interval=30.0, retry_interval=5.0):
        self.remote = remote
        self.handler = handler
        self.require_ofport = require_ofport
        self.resync_interval = resync_interval
        self.retry_interval = retry_interval
        self._present = frozenset()
        self._pending = {}          # port id -> plugged?, to call again
        self._sync_pending = False
        self._next_resync = None
        self._next_retry = None
        self._stopping = threading.Event()
        self._thread = None
        self._wake_r = self._wake_w = None
        self.snapshots = 0          # snapshots taken since start (tests)

    @property
    def present(self):
        """Port ids with an interface in the last snapshot."""
        return self._present

    def start(self):
        assert self._thread is None, 'already started'
        self._stopping.clear()
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name='ovs-binder-watch')
        self._thread.start()

    def stop(self, timeout=10):
        """Stop the thread and close the OVSDB connection."""
        if self._thread is None:
            return
        self._stopping.set()
        os.write(self._wake_w, b'x')
        self._thread.join(timeout)
        if self._thread.is_alive():
            LOG.warning('OVSDB watcher thread still running after %s s',
                        timeout)
            return
        self._thread = None
        os.close(self._wake_r)
        os.close(self._wake_w)

    def wait(self, timeout=None):
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the thread --------------------------------------------------------

    def _run(self):
        while not self._stopping.is_set():
            try:
                self._watch()
            except Exception:
                LOG.exception('OVSDB watcher for %s failed, starting over '
                              'in %s s', self.remote, self.retry_interval)
                self._stopping.wait(self.retry_interval)

    def _watch(self):
        helper = ovs.db.idl.SchemaHelper(schema_json=_SCHEMA)
        helper.register_columns('Interface',
                                ['name', 'external_ids', 'ofport'])
        idl = ovs.db.idl.Idl(self.remote, helper)
        LOG.info('watching OVSDB %s for interfaces with an iface-id',
                 self.remote)
        monitoring = False
        seqno = None
        try:
            while not self._stopping.is_set():
                idl.run()
                now_monitoring = idl.state == idl.IDL_S_MONITORING
                if now_monitoring and not monitoring:
                    LOG.info('OVSDB %s: connected, table loaded', self.remote)
                elif monitoring and not now_monitoring:
                    LOG.warning('OVSDB %s: connection lost, reconnecting',
                                self.remote)
                fresh = now_monitoring and not monitoring
                monitoring = now_monitoring
                if monitoring and (fresh or idl.change_seqno != seqno):
                    seqno = idl.change_seqno
                    self._snapshot(idl, fresh)
                self._timers(monitoring)
                self._block(idl, monitoring)
        finally:
            idl.close()
            LOG.info('stopped watching OVSDB %s', self.remote)

    def _snapshot(self, idl, fresh):
        counts = _interface_port_ids(idl, self.require_ofport)
        now = frozenset(counts)
        old = self._present
        self._present = now
        self.snapshots += 1
        for port_id in sorted(now - old):
            self._pending[port_id] = True
        for port_id in sorted(old - now):
            self._pending[port_id] = False
        self._flush()
        if fresh:
            self._sync()

    def _flush(self):
        for port_id, plugged in list(self._pending.items()):
            if self._stopping.is_set():
                return
            call = self.handler.plugged if plugged else \
                self.handler.unplugged
            try:
                call(port_id)
            except Exception:
                LOG.exception('port %s %s: report failed, trying again in '
                              '%s s', port_id,
                              'plugged' if plugged else 'unplugged',
                              self.retry_interval)
                continue
            # a newer state may have replaced this one meanwhile: no
            if self._pending.get(port_id) is plugged:
                del self._pending[port_id]

    def _sync(self):
        self._sync_pending = True
        if self.resync_interval:
            self._next_resync = time.monotonic() + self.resync_interval
        try:
            self.handler.synced(self._present)
        except Exception:
            LOG.exception('reconciling %d present ports failed, trying '
                          'again in %s s', len(self._present),
                          self.retry_interval)
            return
        self._sync_pending = False

    def _timers(self, monitoring):
        now = time.monotonic()
        if self._pending or self._sync_pending:
            if self._next_retry is None:
                self._next_retry = now + self.retry_interval
            elif now >= self._next_retry:
                self._flush()
                if self._sync_pending and monitoring:
                    self._sync()
                self._next_retry = None
                if self._pending or self._sync_pending:
                    self._next_retry = time.monotonic() + \
                        self.retry_interval
        else:
            self._next_retry = None
        if monitoring and self._next_resync is not None and \
                now >= self._next_resync:
            self._sync()

    def _block(self, idl, monitoring):
        poller = ovs.poller.Poller()
        idl.wait(poller)
        poller.fd_wait(self._wake_r, ovs.poller.POLLIN)
        # no resync while disconnected: the reconnection brings one
        deadlines = [d for d in (self._next_retry,
                                 self._next_resync if monitoring else None)
                     if d is not None]
        if deadlines:
            poller.timer_wait(
                max(1, int((min(deadlines) - time.monotonic()) * 1000)))
        poller.block()
