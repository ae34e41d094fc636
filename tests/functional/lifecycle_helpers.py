"""Helpers shared by the pause/suspend, snapshot and diagnostics tests: a
ticking test guest, its tick counter, its serial-console shell, and a
recorder of the lifecycle events the driver emits."""
import hashlib
import os
import re
import socket
import time

import nova_harness

TICK_RE = re.compile(r'(?<![\w-])tick (\d+)\b')
SHELL_READY = 'NOVA-BHYVE-SHELL-READY'
INIT = 'NOVA-BHYVE-GUEST-INIT'


def ticking_image(test, fmt='qcow2'):
    """Direct-boot image whose guest prints ``tick N`` every second."""
    m = test.manifest
    kernel = nova_harness.glance_image(test.glance, 'nb-kernel', m['vmlinuz'],
                                       'aki', container='aki')
    ramdisk = nova_harness.glance_image(test.glance, 'nb-initrd',
                                        m['initrd'], 'ari', container='ari')
    root = m['root_qcow2'] if fmt == 'qcow2' else m['root_raw']
    return nova_harness.glance_image(
        test.glance, 'nb-tick-' + fmt, root, fmt,
        properties={'kernel_id': kernel['id'], 'ramdisk_id': ramdisk['id'],
                    'os_command_line': 'console=ttyS0 nbtick=1'})


def ticks(output):
    return [int(n) for n in TICK_RE.findall(output)]


def console_log(test, server):
    """The whole console log from the host (Nova's API returns a tail)."""
    with open(os.path.join(test.vmdir(server), 'console.log'),
              errors='replace') as f:
        return f.read()


def wait_for_tick(test, server, at_least, timeout=nova_harness.BOOT_TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        t = ticks(console_log(test, server))
        if t and t[-1] >= at_least:
            return t
        if time.monotonic() > deadline:
            test.fail('no tick >= %d within %ds; ticks %s' % (
                at_least, timeout, t[-10:]))
        time.sleep(0.3)


def guest_shell(test, server, command, expect, timeout=120, boots=1):
    """Type ``command`` into the guest's serial shell (QEMU's serial socket,
    prompt 'nbguest# ') and wait for ``expect`` in the console log.
    ``boots``: the shell of the boots-th boot of this server."""
    test.wait_for_console(server, SHELL_READY, count=boots)
    before = console_log(test, server).count(expect)
    path = nova_harness.vm_socket(test.vmdir(server), 'serial')
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.sendall(b'\n' + command.encode() + b'\n')
        deadline = time.monotonic() + timeout
        while console_log(test, server).count(expect) <= before:
            if time.monotonic() > deadline:
                test.fail('%r did not print %r within %ds; console tail:\n%s'
                          % (command, expect, timeout,
                             console_log(test, server)[-2000:]))
            time.sleep(0.3)


class EventRecorder:
    """Wraps the driver's lifecycle watcher: records each emitted event's
    transition name, then passes the event on to Nova."""

    def __init__(self, driver):
        self.names = []
        watcher = driver.watcher
        self._orig = watcher._emit

        def emit(event):
            self.names.append(event.transition)
            self._orig(event)
        watcher._emit = emit

    def wait_for(self, name, timeout=30):
        deadline = time.monotonic() + timeout
        while name not in self.names:
            if time.monotonic() > deadline:
                raise AssertionError('no %s event within %ds (got %s)' % (
                    name, timeout, self.names))
            time.sleep(0.1)


def keep_uploaded_image_data(glance):
    """Nova's Glance fixture ignores the data given to update(); store it
    (and its size and checksums) the way a real Glance upload would, so a
    server can boot from a snapshot."""
    orig = glance.update

    def update(context, image_id, metadata, data=None, purge_props=False):
        image = orig(context, image_id, metadata, None, purge_props)
        if data is not None:
            blob = data.read()
            glance._imagedata[image_id] = blob
            image.update({'size': len(blob),
                          'checksum': hashlib.md5(blob).hexdigest(),
                          'os_hash_algo': 'sha512',
                          'os_hash_value': hashlib.sha512(blob).hexdigest()})
        return image
    glance.update = update
