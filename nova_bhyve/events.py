"""Lifecycle events: tell Nova at once when a VM starts, stops or pauses.

One watcher thread per running VM blocks on the backend's event channel
(QEMU: a dedicated QMP monitor; otherwise polling) and emits a
nova.virt.event.LifecycleEvent whenever the power state changes - so a VM
process killed from outside shows as SHUTOFF in Nova without waiting for the
periodic power state sync.
"""
import threading
import time

from nova.compute import power_state
from nova.virt import event as virtevent
from oslo_log import log as logging

LOG = logging.getLogger(__name__)

_TRANSITIONS = {
    power_state.RUNNING: virtevent.EVENT_LIFECYCLE_STARTED,
    power_state.PAUSED: virtevent.EVENT_LIFECYCLE_PAUSED,
    power_state.SUSPENDED: virtevent.EVENT_LIFECYCLE_SUSPENDED,
    power_state.SHUTDOWN: virtevent.EVENT_LIFECYCLE_STOPPED,
    power_state.CRASHED: virtevent.EVENT_LIFECYCLE_STOPPED,
}


def transition(old, new):
    """The LifecycleEvent transition for a power state change, or None."""
    if new == old:
        return None
    if new == power_state.RUNNING and old == power_state.PAUSED:
        return virtevent.EVENT_LIFECYCLE_RESUMED
    return _TRANSITIONS.get(new)


class LifecycleWatcher:

    def __init__(self, hypervisor, emit):
        self._hypervisor = hypervisor
        self._emit = emit
        self._lock = threading.Lock()
        self._stops = {}

    def watch(self, vmdir):
        """Start watching ``vmdir``'s VM (replacing an older watch)."""
        stop = threading.Event()
        with self._lock:
            old = self._stops.pop(vmdir.uuid, None)
            if old is not None:
                old.set()
            self._stops[vmdir.uuid] = stop
        threading.Thread(target=self._run, args=(vmdir, stop), daemon=True,
                         name='nova-bhyve-watch-%s' % vmdir.uuid).start()

    def unwatch(self, uuid):
        with self._lock:
            stop = self._stops.pop(uuid, None)
        if stop is not None:
            stop.set()

    def stop_all(self):
        with self._lock:
            stops, self._stops = list(self._stops.values()), {}
        for stop in stops:
            stop.set()

    def _run(self, vmdir, stop):
        last = self._hypervisor.power_state(vmdir)
        try:
            while not stop.is_set():
                alive = self._hypervisor.wait_for_change(vmdir, stop)
                if stop.is_set():
                    break
                if not alive:
                    self._settle(vmdir)
                state = self._hypervisor.power_state(vmdir)
                change = transition(last, state)
                if change is not None:
                    LOG.info('instance %s: power state %s -> %s', vmdir.uuid,
                             power_state.STATE_MAP.get(last, last),
                             power_state.STATE_MAP.get(state, state))
                    self._emit(virtevent.LifecycleEvent(vmdir.uuid, change))
                last = state
                if not alive:
                    break
        except Exception:
            LOG.exception('lifecycle watcher for %s failed', vmdir.uuid)
        finally:
            with self._lock:
                if self._stops.get(vmdir.uuid) is stop:
                    del self._stops[vmdir.uuid]

    def _settle(self, vmdir, timeout=5.0):
        """The event channel closed: give the process a moment to exit."""
        deadline = time.monotonic() + timeout
        while self._hypervisor.pid(vmdir) is not None and \
                time.monotonic() < deadline:
            time.sleep(0.05)
