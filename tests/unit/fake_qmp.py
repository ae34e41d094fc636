"""A QMP server on a real unix socket that receives descriptors
(SCM_RIGHTS) as QEMU does: what is faked is only QEMU behind the socket.

QEMU's descriptor commands are modelled (``add-fd`` into the lowest free
fdset, ``remove-fd``, ``query-fdsets``, ``getfd``/``closefd`` names); a
test's ``handler(command, arguments)`` answers everything else (a value is
the reply's ``return``; a ``Fail`` raised is an error reply; ``Messages``
are sent as they are, events included). Every command
is recorded with the targets (/proc/self/fd readlink) of the descriptors
that came with it. A handler takes a named descriptor with ``take(name)``
(as ``migrate fd:NAME`` consumes it).
"""
import json
import os
import socket
import threading


class Messages(list):
    """A handler's answer sent as it is: the reply and events around it."""


class Fail(Exception):
    def __init__(self, desc, error_class='GenericError'):
        super().__init__(desc)
        self.desc, self.error_class = desc, error_class


def target(fd):
    return os.readlink('/proc/self/fd/%d' % fd)


class FakeQMP:

    def __init__(self, path, handler=None):
        self.handler = handler or (lambda command, arguments: {})
        #: (command, arguments, [targets of the descriptors passed with it])
        self.calls = []
        self.fdsets = {}           # id -> [(fd, opaque)]
        self.named = {}            # getfd name -> fd
        self._lock = threading.Lock()
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(8)
        threading.Thread(target=self._serve, daemon=True).start()

    def commands(self):
        return [c for c, _, _ in self.calls]

    def take(self, name):
        with self._lock:
            return self.named.pop(name)

    def open_targets(self):
        """Targets of the descriptors QEMU would still hold."""
        with self._lock:
            return sorted([target(fd) for s in self.fdsets.values()
                           for fd, _ in s] +
                          [target(fd) for fd in self.named.values()])

    def close(self):
        self.srv.close()
        with self._lock:
            for s in self.fdsets.values():
                for fd, _ in s:
                    os.close(fd)
            for fd in self.named.values():
                os.close(fd)
            self.fdsets, self.named = {}, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- serving ---------------------------------------------------------

    def _serve(self):
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._conn, args=(conn,),
                             daemon=True).start()

    def _conn(self, conn):
        buf, fds = b'', []
        with conn:
            conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            while True:
                while b'\n' not in buf:
                    try:
                        data, got, _, _ = socket.recv_fds(conn, 65536, 16)
                    except OSError:
                        data, got = b'', []
                    fds += got
                    if not data:
                        for fd in fds:
                            os.close(fd)
                        return
                    buf += data
                line, buf = buf.split(b'\n', 1)
                req = json.loads(line)
                reply = self._answer(req['execute'], req.get('arguments'),
                                     fds)
                fds = []
                out = reply if isinstance(reply, Messages) else [reply]
                try:
                    conn.sendall(b''.join(json.dumps(m).encode() + b'\n'
                                          for m in out))
                except OSError:
                    return

    def _answer(self, command, args, fds):
        if command == 'qmp_capabilities':
            return {'return': {}}
        self.calls.append((command, args, [target(fd) for fd in fds]))
        try:
            builtin = getattr(self, '_' + command.replace('-', '_'), None)
            if builtin is not None:
                return {'return': builtin(args or {}, fds)}
            for fd in fds:
                os.close(fd)
            got = self.handler(command, args)
            return got if isinstance(got, Messages) else {'return': got}
        except Fail as e:
            return {'error': {'class': e.error_class, 'desc': e.desc}}

    # -- QEMU's descriptor commands -----------------------------------------

    @staticmethod
    def _one(fds, command):
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise Fail('%s: No file descriptor supplied via SCM_RIGHTS'
                       % command)
        return fds[0]

    def _add_fd(self, args, fds):
        fd = self._one(fds, 'add-fd')
        with self._lock:
            fdset = args.get('fdset-id')
            if fdset is None:
                fdset = min(set(range(len(self.fdsets) + 1)) -
                            set(self.fdsets))
            self.fdsets.setdefault(fdset, []).append((fd, args.get('opaque')))
        return {'fdset-id': fdset, 'fd': fd}

    def _remove_fd(self, args, fds):
        with self._lock:
            if args['fdset-id'] not in self.fdsets:
                raise Fail('File descriptor named \'fdset-id:%d\' not found'
                           % args['fdset-id'])
            for fd, _ in self.fdsets.pop(args['fdset-id']):
                os.close(fd)
        return {}

    def _query_fdsets(self, args, fds):
        with self._lock:
            return [{'fdset-id': i, 'fds': [{'fd': fd, 'opaque': o}
                                            for fd, o in s]}
                    for i, s in sorted(self.fdsets.items())]

    def _getfd(self, args, fds):
        fd = self._one(fds, 'getfd')
        with self._lock:
            old = self.named.pop(args['fdname'], None)
            self.named[args['fdname']] = fd
        if old is not None:
            os.close(old)
        return {}

    def _closefd(self, args, fds):
        with self._lock:
            fd = self.named.pop(args['fdname'], None)
        if fd is None:
            raise Fail('File descriptor named \'%s\' not found'
                       % args['fdname'])
        os.close(fd)
        return {}
