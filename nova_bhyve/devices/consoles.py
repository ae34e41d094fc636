"""Remote consoles: serial on TCP and VNC (RFB), as Nova asks for them.

* Serial: when ``[serial_console] enabled``, the guest's COM1 is a raw TCP
  server on ``[serial_console] proxyclient_address``, on a port taken from
  ``[serial_console] port_range`` with Nova's own nova.console.serial
  helpers (what nova-serialproxy connects to). The console log is still
  written (QEMU's chardev ``logfile=``: a pipe to the VM's console logger,
  docs/sandbox.md). Backends that cannot put the serial
  port on TCP (bhyve: COM1 is an nmdm(4) device) leave it off and
  get_serial_console raises ConsoleTypeUnavailable.
* VNC: when ``[vnc] enabled``, a framebuffer (QEMU: VGA + ``-vnc``; bhyve:
  the fbuf device) listens on ``[vnc] server_listen``, first port tried from
  5900 up, kept in the spec so that a restarted VM gets the same port when
  it is free. QEMU may move to the next free display if the port was taken
  meanwhile; the port actually bound is asked from QEMU (QMP query-vnc).

The chosen ports live in the VM spec (spec.json), so an adopted VM's
consoles are found again after a nova-compute restart.
"""
import os
import socket

from nova import exception
from nova.console import serial as serial_ports
from nova.console import type as ctype
from oslo_log import log as logging

from nova_bhyve import conf

LOG = logging.getLogger(__name__)
CONF = conf.CONF

VNC_BASE_PORT = 5900
VNC_PORT_SPAN = 1000


def port_free(host, port):
    """True if a TCP listener could bind ``host:port`` now."""
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _pick_vnc_port(host, preferred, taken):
    start = preferred or VNC_BASE_PORT
    candidates = list(range(start, VNC_BASE_PORT + VNC_PORT_SPAN))
    if preferred:
        candidates += list(range(VNC_BASE_PORT, preferred))
    for port in candidates:
        if port not in taken and port_free(host, port):
            return port
    raise exception.SocketPortRangeExhaustedException(host=host)


def prepare(spec, hypervisor, vnc_taken=()):
    """Settle the console endpoints of ``spec`` before its VM starts.

    Keeps ports already in the spec when they are still free, takes new
    ones otherwise, and turns consoles off that the configuration or the
    backend does not offer. Returns True if ``spec`` changed (save it).
    """
    c = spec.consoles
    before = (c.serial_host, c.serial_port, c.vnc_host, c.vnc_port)

    want_serial = (CONF.serial_console.enabled and
                   hypervisor.supports_serial_tcp)
    if c.serial_port and (not want_serial or
                          c.serial_host !=
                          CONF.serial_console.proxyclient_address or
                          not port_free(c.serial_host, c.serial_port)):
        release_serial(spec)
    if want_serial and not c.serial_port:
        host = CONF.serial_console.proxyclient_address
        c.serial_host, c.serial_port = host, serial_ports.acquire_port(host)
    elif want_serial:
        serial_ports.ALLOCATED_PORTS.add((c.serial_host, c.serial_port))

    if CONF.vnc.enabled and hypervisor.supports_vnc:
        host = CONF.vnc.server_listen
        if c.vnc_host != host or not c.vnc_port or \
                not port_free(host, c.vnc_port):
            c.vnc_host = host
            c.vnc_port = _pick_vnc_port(host, c.vnc_port, set(vnc_taken))
    else:
        c.vnc_host = c.vnc_port = None
    return before != (c.serial_host, c.serial_port, c.vnc_host, c.vnc_port)


def adopt(spec):
    """Mark the serial port of an adopted, running VM as taken."""
    c = spec.consoles
    if c.serial_port:
        serial_ports.ALLOCATED_PORTS.add((c.serial_host, c.serial_port))


def release_serial(spec):
    c = spec.consoles
    if c.serial_port:
        serial_ports.release_port(c.serial_host, c.serial_port)
    c.serial_host = c.serial_port = None


def serial_console(spec):
    c = spec.consoles
    if not c.serial_port:
        raise exception.ConsoleTypeUnavailable(console_type='serial')
    return ctype.ConsoleSerial(host=c.serial_host, port=c.serial_port)


def vnc_console(port):
    """ConsoleVNC for a framebuffer listening on ``port`` (None: none)."""
    if not port:
        raise exception.ConsoleTypeUnavailable(console_type='vnc')
    return ctype.ConsoleVNC(host=CONF.vnc.server_proxyclient_address,
                            port=port)


def rotate_log(path, keep):
    """Keep a console log bounded: when it exceeds ``keep`` bytes, keep its
    last ``keep`` bytes. Called only while the VM is not running."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return
    if size <= keep:
        return
    with open(path, 'rb') as f:
        f.seek(size - keep)
        tail = f.read()
    with open(path, 'wb') as f:
        f.write(tail)


def log_tail(path, limit):
    """The last ``limit`` bytes of a console log (b'' when there is none)."""
    try:
        with open(path, 'rb') as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read(limit)
    except FileNotFoundError:
        return b''
