"""Instance diagnostics from the hypervisor backend's runtime statistics.

``Diagnostics.driver`` stays unset: Nova's field is an enum of in-tree
drivers (libvirt, xenapi, vmwareapi, ironic, hyperv) with no value for an
out-of-tree driver, and claiming one of them would be false. The API then
shows ``"driver": null``. ``hypervisor`` names the backend (qemu, bhyve).
"""
from nova.compute import power_state
from nova.objects import diagnostics as diagnostics_obj

from nova_bhyve import host


def _os():
    return 'freebsd' if host.is_freebsd() else 'linux'


def instance_diagnostics(state, stats, hypervisor_name, config_drive=False):
    """A nova.objects.diagnostics.Diagnostics (2.48+ API format).

    ``stats`` is Hypervisor.stats() of a running VM, or None."""
    diags = diagnostics_obj.Diagnostics(
        state=power_state.STATE_MAP[state], hypervisor=hypervisor_name,
        hypervisor_os=_os(), config_drive=config_drive,
        uptime=stats['uptime'] if stats else None)
    if not stats:
        return diags
    diags.memory_details = diagnostics_obj.MemoryDiagnostics(
        maximum=stats['memory_max_mb'], used=stats['memory_used_mb'])
    for cpu_id, time_ns in stats['cpus']:
        diags.add_cpu(id=cpu_id, time=time_ns)
    for d in stats['disks']:
        diags.add_disk(read_bytes=d['read_bytes'],
                       read_requests=d['read_requests'],
                       write_bytes=d['write_bytes'],
                       write_requests=d['write_requests'],
                       errors_count=d['errors'])
    for nic in stats['nics']:
        diags.add_nic(**nic)
    return diags


def legacy_diagnostics(stats):
    """The pre-2.48 free-form dict (keys as the libvirt driver's)."""
    out = {}
    if not stats:
        return out
    for cpu_id, time_ns in stats['cpus']:
        out['cpu%d_time' % cpu_id] = time_ns
    out['memory'] = stats['memory_max_mb'] * 1024            # KiB
    if stats['memory_used_mb'] is not None:
        out['memory-rss'] = stats['memory_used_mb'] * 1024   # KiB
    for d in stats['disks']:
        name = d['name']
        out[name + '_read'] = d['read_bytes']
        out[name + '_read_req'] = d['read_requests']
        out[name + '_write'] = d['write_bytes']
        out[name + '_write_req'] = d['write_requests']
        out[name + '_errors'] = d['errors']
    out['uptime'] = stats['uptime']
    return out
