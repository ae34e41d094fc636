"""Hypervisor backends behind one interface (see base.Hypervisor)."""
from nova_bhyve import host


def backend_name(requested):
    if requested == 'auto':
        return 'bhyve' if host.is_freebsd() else 'qemu'
    return requested


def get(requested):
    """The backend for the [bhyve]hypervisor option."""
    name = backend_name(requested)
    if name == 'bhyve':
        from nova_bhyve.hypervisor.bhyve import backend as bhyve
        return bhyve.BhyveHypervisor()
    from nova_bhyve.hypervisor.qemu import backend as qemu
    return qemu.QemuHypervisor()
