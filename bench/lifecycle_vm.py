"""A test guest run directly through the driver's QEMU backend, for the
lifecycle benchmarks (snapshot_pause.py, suspend_resume.py).

Each VM gets a private temp directory with a private copy of the test
guest's root image as its base (the shared cache is never written), a qcow2
instance disk on it, the serial socket for typing into the guest shell and
for timestamping what the guest prints. Stopped by PID, directory removed.
"""
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid as uuidlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nova_bhyve import conf  # noqa: E402
from nova_bhyve import guest  # noqa: E402
from nova_bhyve.hypervisor import base  # noqa: E402
from nova_bhyve.hypervisor.qemu import backend as qemu  # noqa: E402
from nova_bhyve.storage import vdsk  # noqa: E402

conf.CONF([], project='nova')
conf.CONF.set_override('qemu_accel', 'tcg', 'bhyve')

MANIFEST = os.path.join(os.environ.get('NOVA_BHYVE_CACHE',
                                       '/var/cache/nova-bhyve'),
                        'test-guest', 'manifest.json')


def say(fmt, *args):
    sys.stderr.write((fmt % args if args else fmt) + '\n')
    sys.stderr.flush()


class SerialReader(threading.Thread):
    """Reads the guest's serial socket; keeps (host monotonic, line)."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.lines = []
        self._stop = False

    def run(self):
        buf = b''
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            now = time.monotonic()
            buf += data
            while b'\n' in buf:
                line, buf = buf.split(b'\n', 1)
                self.lines.append((now, line.decode(errors='replace')
                                   .strip('\r')))

    def send(self, text):
        self.sock.sendall(text.encode())

    def close(self):
        self._stop = True
        try:
            self.sock.close()
        except OSError:
            pass


class BenchVM:

    def __init__(self, memory_mb=256, cmdline='console=ttyS0 nbtick=1'):
        with open(MANIFEST) as f:
            self.m = json.load(f)
        self.tmp = tempfile.mkdtemp(prefix='nbb-')
        self.vmdir = base.VMDir(os.path.join(self.tmp, str(uuidlib.uuid4())))
        os.makedirs(self.vmdir.path)
        self.base = os.path.join(self.tmp, 'base.qcow2')
        shutil.copy(self.m['root_qcow2'], self.base)
        vdsk.create(self.vmdir.disk(), 'qcow2', 1 << 30, backing=self.base,
                    backing_fmt='qcow2')
        self.spec = guest.VMSpec(
            uuid=self.vmdir.uuid, name='bench', vcpus=1, memory_mb=memory_mb,
            disks=[guest.Disk(path=self.vmdir.disk())],
            boot=guest.Boot(kernel=self.m['vmlinuz'],
                            ramdisk=self.m['initrd'], cmdline=cmdline))
        self.hv = qemu.QemuHypervisor()
        self.serial = None

    def log(self):
        with open(self.vmdir.console_log, errors='replace') as f:
            return f.read()

    def wait_log(self, text, count=1, timeout=600):
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if time.monotonic() > deadline:
                raise RuntimeError('no %r; tail: %s' % (text,
                                                        self.log()[-1500:]))
            time.sleep(0.2)

    def start(self):
        t0 = time.monotonic()
        self.hv.start(self.spec, self.vmdir)
        self.wait_log('NOVA-BHYVE-SHELL-READY')
        say('booted in %.1f s', time.monotonic() - t0)
        self.attach()

    def attach(self):
        if self.serial:
            self.serial.close()
        self.serial = SerialReader(self.vmdir.serial)
        self.serial.start()

    def shell(self, command, expect, timeout=600):
        n = self.log().count(expect)
        self.serial.send('\n' + command + '\n')
        self.wait_log(expect, n + 1, timeout)

    def ticks(self):
        return [int(x) for x in re.findall(r'(?<![\w-])tick (\d+)\b',
                                           self.log())]

    def stop(self):
        if self.serial:
            self.serial.close()
        try:
            self.hv.kill(self.vmdir)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
