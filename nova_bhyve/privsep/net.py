"""The only operations nova-bhyve runs with privileges (see privsep/__init__).

Each function checks its own arguments where it runs - in the privileged
process - so a compromised nova-compute can create and remove taps, put a
tap on a bridge or an OVS bridge, and nothing else: it cannot delete a
device that is not a tap, nor pass anything that reaches a shell.
"""
import os
import re
import sys
import uuid as uuidlib

from nova_bhyve import privsep
from nova_bhyve.net import freebsd
from nova_bhyve.net import linux

_IFNAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$')
_MAC = re.compile(r'^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$')
#: the devices this driver makes for ports (Neutron's agents' names)
TAP_PREFIX = 'tap'


def _ifname(name):
    if not isinstance(name, str) or not _IFNAME.match(name):
        raise privsep.Refused('%r is not an interface name' % (name,))
    return name


def _tap(name):
    if not _ifname(name).startswith(TAP_PREFIX):
        raise privsep.Refused('%r is not a tap this driver manages '
                              '(names start with %r)' % (name, TAP_PREFIX))
    return name


def _mac(mac):
    if not isinstance(mac, str) or not _MAC.match(mac):
        raise privsep.Refused('%r is not a MAC address' % (mac,))
    return mac.lower()


def _mtu(mtu):
    if mtu is None:
        return None
    if not isinstance(mtu, int) or isinstance(mtu, bool) or \
            not 68 <= mtu <= 65535:
        raise privsep.Refused('%r is not an MTU' % (mtu,))
    return mtu


def _uid(uid):
    if uid is None:
        return None
    if not isinstance(uid, int) or isinstance(uid, bool) or uid < 0:
        raise privsep.Refused('%r is not a user id' % (uid,))
    return uid


def _text(value, what):
    if not isinstance(value, str) or not value or len(value) > 255 or \
            not value.isprintable() or '"' in value:
        raise privsep.Refused('%r is not a valid %s' % (value, what))
    return value


def _uuid(value):
    try:
        return str(uuidlib.UUID(value))
    except (TypeError, ValueError, AttributeError):
        raise privsep.Refused('%r is not a uuid' % (value,)) from None


def platform():
    """This host's device operations (what runs as root)."""
    if sys.platform.startswith('freebsd'):
        return freebsd.FreeBSDLinks()
    return linux.LinuxLinks()


@privsep.entrypoint
def create_tap(dev, mac, mtu, owner):
    """Create tap ``dev`` (if absent) owned by ``owner`` (the uid that will
    open it: nova-compute's, whose VM processes run as the same user), with
    the host-side form of the port's MAC, the port's MTU, and up."""
    args, owner = (_tap(dev), _mac(mac), _mtu(mtu)), _uid(owner)
    platform().create_tap(*args, owner=owner)


@privsep.entrypoint
def delete_tap(dev):
    dev = _tap(dev)
    platform().delete(dev)


@privsep.entrypoint
def ensure_bridge(bridge):
    bridge = _ifname(bridge)
    platform().ensure_bridge(bridge)


@privsep.entrypoint
def add_to_bridge(bridge, dev):
    args = _ifname(bridge), _tap(dev)
    platform().add_to_bridge(*args)


@privsep.entrypoint
def add_ovs_port(bridge, dev, iface_id, mac, vm_uuid, mtu):
    """Put tap ``dev`` on OVS bridge ``bridge`` with the external ids
    Neutron's agents look for (FreeBSD; on Linux os-vif does this)."""
    args = (_ifname(bridge), _tap(dev), _text(iface_id, 'port id'),
            _mac(mac), _uuid(vm_uuid), _mtu(mtu))
    platform().add_ovs_port(*args)


@privsep.entrypoint
def del_ovs_port(bridge, dev):
    args = _ifname(bridge), _tap(dev)
    platform().del_ovs_port(*args)


class Privileged:
    """The device operations VifPlugger uses, each entry point above run in
    the privileged process; ``exists`` and ``in_use`` (reads) run here."""

    def __init__(self):
        self.name = platform().name

    @staticmethod
    def exists(dev):
        return platform().exists(dev)

    @staticmethod
    def in_use(dev):
        return platform().in_use(dev)

    @staticmethod
    def create_tap(dev, mac, mtu):
        create_tap(dev, mac, mtu, os.geteuid() or None)

    @staticmethod
    def delete(dev):
        delete_tap(dev)

    @staticmethod
    def ensure_bridge(bridge):
        ensure_bridge(bridge)

    @staticmethod
    def add_to_bridge(bridge, dev):
        add_to_bridge(bridge, dev)

    @staticmethod
    def add_ovs_port(bridge, dev, iface_id, mac, vm_uuid, mtu):
        add_ovs_port(bridge, dev, iface_id, mac, vm_uuid, mtu)

    @staticmethod
    def del_ovs_port(bridge, dev):
        del_ovs_port(bridge, dev)
