"""The backend for ``[bhyve] hypervisor``: bhyve on FreeBSD, QEMU elsewhere."""
from nova_bhyve import host
from nova_bhyve.hypervisor.bhyve import backend as bhyve
from nova_bhyve.hypervisor.qemu import backend as qemu


def backend_name(requested):
    if requested == 'auto':
        return 'bhyve' if host.is_freebsd() else 'qemu'
    return requested


def get(requested):
    """A new backend object for the [bhyve] hypervisor option."""
    if backend_name(requested) == 'bhyve':
        return bhyve.BhyveHypervisor()
    return qemu.QemuHypervisor()
