"""A TCP forwarder the tests put between two QEMUs (or a QEMU and its
peer) to inject network faults: a cut link, a stalled one."""
import select
import socket
import threading


class TCPProxy:
    """Forwards connections from a local port to ``target``; ``cut()``
    closes every connection and refuses new ones (a network failure);
    ``hold()`` stops forwarding (bytes wait in the socket buffers, as on a
    stalled link) until ``release()``."""

    def __init__(self, target_host, target_port):
        self.target = (target_host, target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(('127.0.0.1', 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.conns = []
        self.bytes = 0
        self.is_cut = False
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.is_cut:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.is_cut:
                client.close()
                return
            server = socket.create_connection(self.target)
            with self._lock:
                self.conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server),
                             daemon=True).start()

    def _pump(self, a, b):
        peers = {a: b, b: a}
        try:
            while not self.is_cut:
                if not self._flowing.wait(0.2):
                    continue
                ready, _, _ = select.select([a, b], [], [], 0.2)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    peers[s].sendall(data)
                    self.bytes += len(data)
        except OSError:
            return
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def hold(self):
        self._flowing.clear()

    def release(self):
        self._flowing.set()

    def cut(self):
        self.is_cut = True
        self.listener.close()
        with self._lock:
            for s in self.conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
