"""The Neutron worker that runs the OVSDB watcher."""
from neutron_lib import constants
from neutron_lib import worker


class WatcherWorker(worker.BaseWorker):
    """Runs ``make_watcher()``'s watcher while started.

    A thread (worker_process_count 0) in neutron-periodic-workers, the one
    Neutron process that starts the plugins' workers."""

    def __init__(self, make_watcher):
        super().__init__(worker_process_count=0,
                         set_proctitle=constants.SETPROCTITLE_OFF,
                         desc='bhyve_ovs OVSDB watcher')
        self._make_watcher = make_watcher
        self._watcher = None

    def start(self, name='neutron-server', desc=None):
        super().start(name=name, desc=desc)
        if self._watcher is None:
            self._watcher = self._make_watcher()
            self._watcher.start()

    def stop(self):
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    def wait(self):
        watcher = self._watcher
        if watcher is not None:
            watcher.wait()

    def reset(self):
        self.stop()
        self.start()
