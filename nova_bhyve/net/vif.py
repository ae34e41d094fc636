"""VIF plugging: Neutron ports become host taps the VM opens by name.

One tap per port, named as Neutron's agents expect (``tap`` + the first 11
characters of the port id, Nova's ``VIF.devname``), carrying the port's MTU.
The driver creates the tap before the hypervisor starts; QEMU opens it with
``-netdev tap,ifname=...,script=no`` and bhyve with ``backend=tapX``.

Bindings (``binding:vif_type``):

``ovs``
    ML2/OVS and OVN. Linux: through os-vif's ``ovs`` plugin
    (``os_vif.plug`` on ``nova_to_osvif_vif``), asking it - as libvirt's
    ``<virtualport type='openvswitch'>`` would - to create the tap and the
    br-int port with external-ids iface-id, attached-mac, iface-status and
    vm-uuid. With ``ovs_hybrid_plug`` os-vif makes the qbr Linux bridge and
    the qvb/qvo veth pair (qvo on br-int) and the driver puts the tap on qbr.
    FreeBSD (no os-vif path): the driver creates the tap and adds the port
    with ``ovs-vsctl``; unverified on a real FreeBSD host (unit tests pin
    the commands). Hybrid plug is refused on FreeBSD.
``bridge``
    The tap is enslaved to the named Linux bridge (created if absent); on
    FreeBSD to the if_bridge(4) of that name (``ifconfig ... addm``). Nova
    has dropped the os-vif linux_bridge plugin, so this is plain ``ip link``.
``tap``
    The tap is created and left for the networking backend.

Anything else (vhostuser, hw_veb, hostdev_physical, direct vnic types, ...)
is refused before anything is created, with InvalidInput so the build
aborts with that message as the fault.

Privileges: the driver's own tap/bridge/OVS operations are the functions
of ``nova_bhyve.privsep.net``, run in a privileged process
(``privsep/__init__.py``: an oslo.privsep daemon of this project's on Linux,
a one-shot helper behind sudo/doas on FreeBSD). net/linux.py and
net/freebsd.py are what runs there, as root. os-vif's own calls go through
its own oslo.privsep context (``vif_plug_ovs_privileged``), as for the
libvirt driver.
"""
import sys
import threading

from nova import exception
from nova.network import os_vif_util
import os_vif
from oslo_log import log as logging

from nova_bhyve import conf
from nova_bhyve import guest
from nova_bhyve.privsep import net as privileged

LOG = logging.getLogger(__name__)
CONF = conf.CONF

SUPPORTED_BINDINGS = ('ovs', 'bridge', 'tap')
NIC_NAME_LEN = 14          # Nova's network_model.NIC_NAME_LEN (IFNAMSIZ - 2)
DEFAULT_OVS_BRIDGE = 'br-int'

_osvif_lock = threading.Lock()
_osvif_ready = False


# -- facts about one VIF (a nova.network.model.VIF or a plain dict) --------

def devname(vif):
    name = vif.get('devname') or ('tap' + vif['id'])
    return name[:NIC_NAME_LEN]


def mtu(vif):
    network = vif.get('network') or {}
    meta = network.get('meta') or {}
    value = meta.get('mtu')
    return int(value) if value else None


def bridge_name(vif):
    network = vif.get('network') or {}
    details = vif.get('details') or {}
    name = details.get('bridge_name') or network.get('bridge')
    if not name and vif.get('type') == 'ovs':
        name = DEFAULT_OVS_BRIDGE
    return name[:NIC_NAME_LEN] if name else None


def is_hybrid(vif):
    details = vif.get('details') or {}
    return bool(details.get('ovs_hybrid_plug'))


def hybrid_names(vif):
    """Names os-vif gives the hybrid plug devices (qbr, qvb, qvo)."""
    suffix = vif['id'][:11]
    return 'qbr' + suffix, 'qvb' + suffix, 'qvo' + suffix


def nic_for(vif, model='virtio'):
    return guest.Nic(mac=vif['address'], ifname=devname(vif), model=model,
                     mtu=mtu(vif))


def _reason(vif):
    vif_type = vif.get('type')
    vnic = vif.get('vnic_type') or 'normal'
    if vif_type not in SUPPORTED_BINDINGS:
        return ('port %s has binding:vif_type %r; nova-bhyve can plug %s' % (
            vif['id'], vif_type, ', '.join(SUPPORTED_BINDINGS)))
    if vnic != 'normal':
        return ('port %s has binding:vnic_type %r; nova-bhyve plugs only '
                'vnic_type normal' % (vif['id'], vnic))
    if sys.platform.startswith('freebsd') and vif_type == 'ovs' and \
            is_hybrid(vif):
        return ('port %s asks for OVS hybrid plug (iptables firewall), '
                'which has no FreeBSD implementation' % vif['id'])
    if not vif.get('address'):
        return 'port %s has no MAC address' % vif['id']
    return None


def plug_events(network_info):
    """The network-vif-plugged events to wait for: one per port Neutron
    has not reported active yet (as the libvirt driver)."""
    return [('network-vif-plugged', vif['id'])
            for vif in network_info or []
            if vif.get('active', True) is False]


def validate(network_info):
    """Refuse bindings this driver cannot plug, before anything is made."""
    for vif in network_info or []:
        reason = _reason(vif)
        if reason:
            raise exception.InvalidInput(reason=reason)


# -- plugging ---------------------------------------------------------------

def _init_osvif():
    global _osvif_ready
    with _osvif_lock:
        if not _osvif_ready:
            os_vif.initialize()
            _osvif_ready = True


class VifPlugger:
    """Plugs and unplugs ports. ``impl`` does the device work: by default
    through the privileged process; tests pass a platform class
    directly."""

    def __init__(self, impl=None):
        self.impl = impl or privileged.Privileged()

    # ovs: os-vif on Linux (as for the libvirt driver), ovs-vsctl on FreeBSD
    def _plug_ovs(self, instance, vif):
        dev = devname(vif)
        if self.impl.name == 'freebsd':
            self.impl.create_tap(dev, vif['address'], mtu(vif))
            self.impl.add_ovs_port(
                bridge_name(vif), dev, vif.get('ovs_interfaceid') or vif['id'],
                vif['address'], instance.uuid, mtu(vif))
            return
        _init_osvif()
        obj = os_vif_util.nova_to_osvif_vif(vif)
        info = os_vif_util.nova_to_osvif_instance(instance)
        if is_hybrid(vif):
            # os-vif makes qbr/qvb/qvo; the tap goes on qbr
            os_vif.plug(obj, info)
            self.impl.create_tap(dev, vif['address'], mtu(vif))
            self.impl.add_to_bridge(obj.bridge_name, dev)
            return
        # What libvirt's <virtualport type='openvswitch'> does for the
        # libvirt driver: the tap (ours: owned by the VM's user, fe: MAC;
        # os-vif keeps a tap that exists) and the br-int port with its ids.
        self.impl.create_tap(dev, vif['address'], mtu(vif))
        obj.port_profile.create_port = True
        obj.port_profile.create_tap = True
        os_vif.plug(obj, info)

    def _unplug_ovs(self, instance, vif):
        dev = devname(vif)
        if self.impl.name == 'freebsd':
            self.impl.del_ovs_port(bridge_name(vif), dev)
            self.impl.delete(dev)
            return
        _init_osvif()
        obj = os_vif_util.nova_to_osvif_vif(vif)
        info = os_vif_util.nova_to_osvif_instance(instance)
        self.impl.delete(dev)
        if not is_hybrid(vif):
            obj.port_profile.create_port = True
            obj.port_profile.create_tap = True
        os_vif.unplug(obj, info)

    def plug(self, instance, vif):
        """Plug one VIF; return the guest.Nic the VM gets for it."""
        reason = _reason(vif)
        if reason:
            raise exception.InvalidInput(reason=reason)
        vif_type = vif['type']
        dev = devname(vif)
        LOG.debug('plugging %s port %s as %s', vif_type, vif['id'], dev,
                  instance=instance)
        try:
            if vif_type == 'ovs':
                self._plug_ovs(instance, vif)
            else:
                self.impl.create_tap(dev, vif['address'], mtu(vif))
                if vif_type == 'bridge':
                    bridge = bridge_name(vif)
                    if not bridge:
                        raise exception.InvalidInput(
                            reason='bridge port %s names no bridge'
                                   % vif['id'])
                    self.impl.ensure_bridge(bridge)
                    self.impl.add_to_bridge(bridge, dev)
        except exception.InvalidInput:
            self._unplug_quietly(instance, vif)
            raise
        except Exception as e:
            self._unplug_quietly(instance, vif)
            raise exception.VirtualInterfacePlugException(
                'plugging %s port %s (%s) failed: %s' % (
                    vif_type, vif['id'], dev, e))
        return nic_for(vif)

    def unplug(self, instance, vif):
        vif_type = vif.get('type')
        dev = devname(vif)
        if vif_type in SUPPORTED_BINDINGS and dev and self.impl.in_use(dev):
            # This instance's VM is gone, yet its tap is held: by the VM of
            # another compute of this machine that took the instance over
            # (a live migration's other end). Its tap and port stay.
            LOG.info('tap %s of port %s is held by another VM process of '
                     'this machine: left in place', dev, vif.get('id'),
                     instance=instance)
            return
        if vif_type == 'ovs' and not _reason(vif):
            self._unplug_ovs(instance, vif)
        elif vif_type in SUPPORTED_BINDINGS:
            self.impl.delete(devname(vif))

    def _unplug_quietly(self, instance, vif):
        try:
            self.unplug(instance, vif)
        except Exception as e:
            LOG.warning('unplugging port %s: %s', vif.get('id'), e,
                        instance=instance)

    def plug_all(self, instance, network_info):
        """Plug every VIF (all or nothing); return the NICs in order."""
        validate(network_info)
        nics, done = [], []
        try:
            for vif in network_info or []:
                nics.append(self.plug(instance, vif))
                done.append(vif)
        except Exception:
            for vif in reversed(done):
                self._unplug_quietly(instance, vif)
            raise
        return nics

    def unplug_all(self, instance, network_info, ignore_errors=True):
        for vif in network_info or []:
            if ignore_errors:
                self._unplug_quietly(instance, vif)
            else:
                self.unplug(instance, vif)


def _plug_failed(event_name, instance):
    LOG.error('Neutron reported failure on event %s', event_name,
              instance=instance)
    if CONF.vif_plugging_is_fatal:
        raise exception.VirtualInterfaceCreateException()


def plug_and_wait(virtapi, plugger, instance, network_info, model):
    """Plug the VIFs; then wait until Neutron reports each port that was not
    active yet as wired (network-vif-plugged), before the guest runs - as
    the libvirt driver does: a guest that boots first misses its DHCP.
    Nova's [DEFAULT] vif_plugging_timeout (0: do not wait) and
    vif_plugging_is_fatal apply. Returns the NICs, of NIC model ``model``.
    """
    validate(network_info)
    events = plug_events(network_info)
    timeout = CONF.vif_plugging_timeout
    nics = []
    if not events or not timeout:
        nics = plugger.plug_all(instance, network_info)
    else:
        try:
            with virtapi.wait_for_instance_event(
                    instance, events, timeout=timeout,
                    error_callback=_plug_failed):
                nics = plugger.plug_all(instance, network_info)
        except exception.InstanceEventTimeout:
            LOG.warning('no %s from Neutron within %d s (vm_state %s, '
                        'task_state %s)', ', '.join(n for n, _ in events),
                        timeout, instance.vm_state, instance.task_state,
                        instance=instance)
            if CONF.vif_plugging_is_fatal:
                raise exception.VirtualInterfaceCreateException()
    for nic in nics:
        nic.model = model
    return nics
