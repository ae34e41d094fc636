"""The VM spec: what one virtual machine is, independent of the hypervisor.

Built from Nova's instance, flavor and image metadata plus the paths the
storage layer prepared. Pure data and validation, no I/O: both backends render
it (QEMU command line, bhyve config tree), and it is saved as JSON in the
instance directory so a restarted nova-compute can adopt the running VM.
"""
import dataclasses
import json
import typing

from nova import exception

from nova_bhyve.sandbox import cgroups

# Disk buses and NIC models both backends can render.
DISK_BUSES = ('virtio', 'sata', 'ide')
NIC_MODELS = ('virtio', 'e1000')
MIN_MEMORY_MB = 32
MAX_VCPUS = 64        # bhyve's VM_MAXCPU on FreeBSD 13+ default kernels
CPU_QUOTA_SPECS = ('quota:cpu_shares', 'quota:cpu_period', 'quota:cpu_quota')


@dataclasses.dataclass
class Disk:
    path: str
    format: str = 'qcow2'          # raw | qcow2 (what the hypervisor opens)
    bus: str = 'virtio'
    device: str = 'disk'           # disk | cdrom
    readonly: bool = False
    # Cinder volume id for an attached volume (the guest sees it as the
    # disk's serial; hot-pluggable); None for disks the driver made.
    serial: typing.Optional[str] = None


@dataclasses.dataclass
class Nic:
    mac: str
    ifname: str                    # host-side tap device
    model: str = 'virtio'
    mtu: typing.Optional[int] = None


@dataclasses.dataclass
class Boot:
    """Direct kernel boot when kernel is set, firmware boot otherwise."""
    kernel: typing.Optional[str] = None
    ramdisk: typing.Optional[str] = None
    cmdline: typing.Optional[str] = None


@dataclasses.dataclass
class Consoles:
    """Remote consoles. None means off: the serial console then stays on a
    unix socket (VMDir.serial), and there is no framebuffer."""
    serial_host: typing.Optional[str] = None     # serial on TCP host:port
    serial_port: typing.Optional[int] = None
    vnc_host: typing.Optional[str] = None        # VNC/RFB listen address
    vnc_port: typing.Optional[int] = None        # first port tried


@dataclasses.dataclass
class VMSpec:
    uuid: str
    name: str
    vcpus: int
    memory_mb: int
    disks: typing.List[Disk] = dataclasses.field(default_factory=list)
    nics: typing.List[Nic] = dataclasses.field(default_factory=list)
    boot: Boot = dataclasses.field(default_factory=Boot)
    consoles: Consoles = dataclasses.field(default_factory=Consoles)
    # empty PCIe root ports ('hpN') kept free at boot for hot-plugging
    # NICs and volumes (QEMU pcie-root-port)
    hotplug_ports: int = 0
    # the flavor's quota:cpu_shares/_period/_quota extra specs (the VM
    # process's cgroup, when sandboxed)
    cpu_quota: typing.Dict[str, str] = dataclasses.field(
        default_factory=dict)
    # the versioned machine type the VM was first started with (QEMU:
    # 'pc-q35-7.2'), kept across every move; None: the backend has none
    # (bhyve), or a spec older than this field (QEMU's 'q35' alias)
    machine: typing.Optional[str] = None

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text):
        data = json.loads(text)
        data['disks'] = [Disk(**d) for d in data.get('disks', [])]
        data['nics'] = [Nic(**n) for n in data.get('nics', [])]
        data['boot'] = Boot(**data.get('boot') or {})
        data['consoles'] = Consoles(**data.get('consoles') or {})
        return cls(**data)


DEFAULT_KERNEL_CMDLINE = 'console=ttyS0'


def disk_bus(image_meta):
    bus = image_meta.properties.get('hw_disk_bus', 'virtio')
    if bus not in DISK_BUSES:
        raise exception.ImageUnacceptable(
            image_id=image_meta.id if 'id' in image_meta else None,
            reason='hw_disk_bus=%s is not supported by this driver '
                   '(supported: %s)' % (bus, ', '.join(DISK_BUSES)))
    return bus


def validate_flavor(flavor):
    """Refuse flavors no backend can run, before anything is created."""
    if flavor.vcpus < 1 or flavor.vcpus > MAX_VCPUS:
        raise exception.InvalidInput(
            reason='flavor %s: %d vCPUs is outside 1..%d' % (
                flavor.name, flavor.vcpus, MAX_VCPUS))
    if flavor.memory_mb < MIN_MEMORY_MB:
        raise exception.InvalidInput(
            reason='flavor %s: %d MiB of memory is below the minimum of '
                   '%d MiB' % (flavor.name, flavor.memory_mb, MIN_MEMORY_MB))


def cpu_quota(flavor):
    """The flavor's quota:cpu_* extra specs (as libvirt reads them),
    checked; InvalidInput for a value no cgroup can take."""
    is_set = getattr(flavor, 'obj_attr_is_set', None)
    extra = (flavor.extra_specs if is_set is None or is_set('extra_specs')
             else None) or {}
    specs = {k: str(v) for k, v in extra.items() if k in CPU_QUOTA_SPECS}
    try:
        cgroups.limits_for(flavor.memory_mb, flavor.vcpus, specs, 0, 1)
    except ValueError as e:
        raise exception.InvalidInput(reason='flavor %s: %s'
                                     % (flavor.name, e))
    return specs


def validate_flavor_fits_host(flavor, host_vcpus, host_memory_mb):
    """Refuse a flavor larger than this host (pure: the caller passes the
    host's CPUs and total memory in MiB).

    Placement refuses such a flavor first (the inventory's max_unit is the
    host's total); this is the driver's own check for when the inventory
    placement used was wrong. No overcommit for one guest: it could never
    get more CPUs or memory than the host has.
    """
    if flavor.vcpus > host_vcpus:
        raise exception.InvalidInput(
            reason='flavor %s: %d vCPUs, but this host has only %d CPUs' % (
                flavor.name, flavor.vcpus, host_vcpus))
    if flavor.memory_mb > host_memory_mb:
        raise exception.InvalidInput(
            reason='flavor %s: %d MiB of memory, but this host has only '
                   '%d MiB' % (flavor.name, flavor.memory_mb,
                               host_memory_mb))


def build(instance, image_meta, root_disk, kernel=None, ramdisk=None,
          nics=()):
    """VMSpec for ``instance`` booting ``root_disk`` (a guest.Disk).

    ``kernel``/``ramdisk`` are local paths of the images named by the
    instance's kernel_id/ramdisk_id, for direct kernel boot.
    """
    flavor = instance.flavor
    validate_flavor(flavor)
    root_disk.bus = disk_bus(image_meta)
    boot = Boot()
    if kernel:
        cmdline = image_meta.properties.get('os_command_line')
        boot = Boot(kernel=kernel, ramdisk=ramdisk,
                    cmdline=cmdline or DEFAULT_KERNEL_CMDLINE)
    elif ramdisk:
        raise exception.ImageUnacceptable(
            image_id=image_meta.id if 'id' in image_meta else None,
            reason='a ramdisk_id needs a kernel_id')
    return VMSpec(uuid=instance.uuid, name=instance.name,
                  vcpus=flavor.vcpus, memory_mb=flavor.memory_mb,
                  disks=[root_disk], nics=list(nics), boot=boot,
                  cpu_quota=cpu_quota(flavor))


def nic_model(image_meta):
    """The NIC model the image asks for (hw_vif_model), virtio by default;
    InvalidInput for one this driver has no device for."""
    model = image_meta.properties.get('hw_vif_model', 'virtio')
    if model not in NIC_MODELS:
        raise exception.InvalidInput(
            reason='hw_vif_model=%s is not supported by nova-bhyve '
                   '(supported: %s)' % (model, ', '.join(NIC_MODELS)))
    return model
