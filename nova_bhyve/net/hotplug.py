"""Interface attach and detach on an existing instance: the port plugged on
the host, the NIC hot-plugged into a running VM (a free PCIe slot of the
spec's hotplug_ports), the spec changed under its lock."""
from nova import exception
from oslo_log import log as logging

from nova_bhyve import instance_store
from nova_bhyve.hypervisor import base
from nova_bhyve.net import vif as net_vif

LOG = logging.getLogger(__name__)


def _free_slot(hypervisor, vmdir, spec):
    used = hypervisor.used_hotplug_ports(vmdir)
    free = [p for p in ('hp%d' % i for i in range(spec.hotplug_ports))
            if p not in used]
    if not free:
        raise exception.InvalidInput(
            reason='no free PCIe slot for another NIC (%d hot-plug slots)'
                   % spec.hotplug_ports)
    return free[0]


def attach(hypervisor, plugger, vmdir, instance, vif, model):
    """InterfaceAttachFailed (the port unplugged again) when any step
    fails."""
    if not getattr(hypervisor, 'attach_nic', None):
        raise exception.InterfaceAttachFailed(instance_uuid=instance.uuid)
    nic = plugger.plug(instance, vif)
    nic.model = model
    try:
        with instance_store.updating(vmdir) as spec:
            if hypervisor.is_running(vmdir):
                hypervisor.attach_nic(vmdir, nic,
                                      _free_slot(hypervisor, vmdir, spec))
            spec.nics = [n for n in spec.nics if n.mac != nic.mac] + [nic]
    except Exception as e:
        LOG.error('attaching port %s failed: %s', vif['id'], e,
                  instance=instance)
        plugger.unplug(instance, vif)
        raise exception.InterfaceAttachFailed(instance_uuid=instance.uuid)


def detach(hypervisor, plugger, vmdir, instance, vif):
    nic = net_vif.nic_for(vif)
    with instance_store.updating(vmdir) as spec:
        if hypervisor.is_running(vmdir):
            try:
                hypervisor.detach_nic(vmdir, nic)
            except base.HypervisorError as e:
                LOG.error('detaching port %s failed: %s', vif['id'], e,
                          instance=instance)
                raise exception.InterfaceDetachFailed(
                    instance_uuid=instance.uuid)
        spec.nics = [n for n in spec.nics if n.mac != nic.mac]
    plugger.unplug(instance, vif)
