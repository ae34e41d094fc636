"""A VMSpec as a bhyve(8) configuration tree (bhyve_config(5)), and back.

Pure apart from write_config; NEVER EXERCISED ON A REAL FREEBSD HOST (see
backend.py and docs/bhyve.md). Pinned by tests/unit/test_bhyve_backend.py.
"""
import collections
import os
import re

from nova_bhyve import conf
from nova_bhyve.hypervisor import base

CONF = conf.CONF

CONFIG_FILE = 'bhyve.conf'

HOSTBRIDGE_SLOT = 0
LPC_SLOT = 31
FIRST_DEVICE_SLOT = 2          # 1 is left free, as in bhyve(8)'s examples
LAST_DEVICE_SLOT = 30
MAX_AHCI_PORTS = 32
FBUF_WIDTH, FBUF_HEIGHT = 1024, 768

NIC_DEVICES = {'virtio': 'virtio-net', 'e1000': 'e1000'}
# net_backends.c matches the backend name by prefix: tap(4) and vmnet(4).
NIC_BACKEND_PREFIXES = ('tap', 'vmnet')
_MAC_RE = re.compile(r'^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$')


def nmdm_pair(spec_uuid):
    """(A side for bhyve's COM1, B side for the console reader)."""
    base_name = '/dev/nmdm%s' % spec_uuid
    return base_name + 'A', base_name + 'B'


def _bool(value):
    return 'true' if value else 'false'


def _pci(slot, key=None):
    node = 'pci.0.%d.0' % slot
    return node if key is None else '%s.%s' % (node, key)


def render_config(spec, vmdir):
    """The bhyve config tree (bhyve_config(5)) for ``spec``: an ordered
    mapping of dotted variable names to string values. Pure.

    Raises HypervisorError for what bhyve cannot run (kernel boot, non-raw
    disks, NIC backends other than tap/vmnet, too many devices).
    """
    if spec.boot.kernel:
        raise base.HypervisorError(
            'instance %s asks for direct kernel boot (kernel_id): bhyve '
            'cannot load a Linux kernel itself; it boots whole-disk images '
            'through UEFI firmware ([bhyve]bhyve_bootrom). Use a whole-disk '
            'image instead of kernel_id/ramdisk_id.' % spec.uuid)
    bootrom = CONF.bhyve.bhyve_bootrom
    if not bootrom:
        raise base.HypervisorError(
            '[bhyve]bhyve_bootrom is empty: bhyve needs UEFI firmware to '
            'boot instance %s' % spec.uuid)

    tree = collections.OrderedDict()
    tree['name'] = spec.name
    tree['uuid'] = spec.uuid
    tree['cpus'] = str(spec.vcpus)
    tree['memory.size'] = '%dM' % spec.memory_mb
    if CONF.bhyve.bhyve_wired_memory:
        tree['memory.wired'] = 'true'      # live migration needs it
    tree['acpi_tables'] = 'true'           # ACPI power button for SIGTERM
    tree['destroy_on_poweroff'] = 'true'   # release vmm memory on exit 1
    tree['rtc.use_localtime'] = 'false'    # RTC in UTC, as Nova guests expect
    tree['x86.vmexit_on_hlt'] = 'true'     # idle vCPUs yield the host CPU
    tree['x86.vmexit_on_pause'] = 'true'
    tree[_pci(HOSTBRIDGE_SLOT, 'device')] = 'hostbridge'
    tree[_pci(LPC_SLOT, 'device')] = 'lpc'
    tree['lpc.com1.path'] = nmdm_pair(spec.uuid)[0]
    tree['lpc.bootrom'] = bootrom

    slots = iter(range(FIRST_DEVICE_SLOT, LAST_DEVICE_SLOT + 1))

    def next_slot(what):
        try:
            return next(slots)
        except StopIteration:
            raise base.HypervisorError(
                'instance %s: no free PCI slot for %s (slots %d-%d are used)'
                % (spec.uuid, what, FIRST_DEVICE_SLOT, LAST_DEVICE_SLOT))

    ahci_slot, ahci_ports = None, 0
    for index, disk in enumerate(spec.disks):
        if disk.format != 'raw':
            raise base.HypervisorError(
                'instance %s: disk %s is %s; bhyve opens raw images and '
                'devices only' % (spec.uuid, disk.path, disk.format))
        ro = disk.readonly or disk.device == 'cdrom'
        if disk.bus == 'virtio' and disk.device == 'disk':
            slot = next_slot('disk %d' % index)
            tree[_pci(slot, 'device')] = 'virtio-blk'
            tree[_pci(slot, 'path')] = disk.path
            if ro:
                tree[_pci(slot, 'ro')] = 'true'
            if disk.serial:       # a Cinder volume: its id as the serial
                tree[_pci(slot, 'ser')] = disk.serial
            continue
        # sata, ide (bhyve has no IDE: AHCI stands in) and every cdrom:
        # ports of one AHCI controller, in spec order.
        if ahci_slot is None:
            ahci_slot = next_slot('the AHCI controller')
            tree[_pci(ahci_slot, 'device')] = 'ahci'
        if ahci_ports >= MAX_AHCI_PORTS:
            raise base.HypervisorError(
                'instance %s: more than %d SATA/IDE/CD-ROM disks'
                % (spec.uuid, MAX_AHCI_PORTS))
        port = 'port.%d' % ahci_ports
        ahci_ports += 1
        tree[_pci(ahci_slot, port + '.type')] = (
            'cd' if disk.device == 'cdrom' else 'hd')
        tree[_pci(ahci_slot, port + '.path')] = disk.path
        if ro:
            tree[_pci(ahci_slot, port + '.ro')] = 'true'

    for index, nic in enumerate(spec.nics):
        if nic.model not in NIC_DEVICES:
            raise base.HypervisorError(
                'instance %s: NIC model %s is not supported on bhyve'
                % (spec.uuid, nic.model))
        if not nic.ifname.startswith(NIC_BACKEND_PREFIXES):
            raise base.HypervisorError(
                'instance %s: NIC %d uses %r; bhyve needs a tap(4) or '
                'vmnet(4) interface' % (spec.uuid, index, nic.ifname))
        if not _MAC_RE.match(nic.mac):
            raise base.HypervisorError(
                'instance %s: bad MAC address %r' % (spec.uuid, nic.mac))
        slot = next_slot('NIC %d' % index)
        tree[_pci(slot, 'device')] = NIC_DEVICES[nic.model]
        tree[_pci(slot, 'backend')] = nic.ifname
        tree[_pci(slot, 'mac')] = nic.mac.lower()
        if nic.mtu and nic.model == 'virtio':   # only virtio-net has mtu
            tree[_pci(slot, 'mtu')] = str(nic.mtu)

    consoles = getattr(spec, 'consoles', None)
    if consoles is not None and consoles.vnc_host and consoles.vnc_port:
        # VNC: the fbuf device's RFB server (pci_fbuf.c: "tcp" or "rfb" is
        # host:port, an IPv6 host in brackets; "w"/"h" the resolution), and
        # an xHCI tablet so that the pointer follows the VNC client.
        host = consoles.vnc_host
        if ':' in host:
            host = '[%s]' % host
        slot = next_slot('the framebuffer')
        tree[_pci(slot, 'device')] = 'fbuf'
        tree[_pci(slot, 'tcp')] = '%s:%d' % (host, consoles.vnc_port)
        tree[_pci(slot, 'w')] = str(FBUF_WIDTH)
        tree[_pci(slot, 'h')] = str(FBUF_HEIGHT)
        slot = next_slot('the xHCI tablet')
        tree[_pci(slot, 'device')] = 'xhci'
        tree[_pci(slot, 'slot.1.device')] = 'tablet'
    return tree


def format_config(tree):
    """The text of a ``bhyve -k`` file: one ``key=value`` per line.

    bhyve expands ``%(var)`` in values, so a literal ``%`` is written as
    ``%%`` (bhyve_config(5) VARIABLE VALUES). No spaces around ``=``.
    """
    lines = ['# bhyve config tree written by nova-bhyve; run: bhyve -k FILE']
    for key, value in tree.items():
        value = str(value)
        if '\n' in value or '\n' in key or '=' in key or not key:
            raise base.HypervisorError('bad bhyve config entry %r=%r'
                                       % (key, value))
        lines.append('%s=%s' % (key, value.replace('%', '%%')))
    return '\n'.join(lines) + '\n'


def parse_config(text):
    """Inverse of format_config (used to find the VM name again)."""
    tree = collections.OrderedDict()
    for line in text.splitlines():
        if not line or line.startswith('#'):
            continue
        key, _, value = line.partition('=')
        tree[key] = value.replace('%%', '%')
    return tree


def write_config(tree, path):
    """Write ``tree`` to ``path`` atomically; return ``path``."""
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(format_config(tree))
    os.replace(tmp, path)
    return path
