"""Rescue: boot an instance from a rescue image with its own disks attached
after the rescue disk.

The rescue VM has its own spec, ``spec.rescue.json`` next to the untouched
``spec.json``, and its own root disk ``disk.rescue`` (a fresh disk made from
the rescue image, like any root disk). In the guest, the rescue disk is the
first disk and the instance's disks follow in their usual order (with virtio:
``vda`` is the rescue disk, ``vdb`` the instance's root disk). Unrescue
removes both files and starts the instance from ``spec.json`` again, so the
original spec is restored byte for byte.

File and spec work (the spec through instance_store); the driver stops
and starts the VMs.
"""
import copy
import os

from nova_bhyve import instance_store

RESCUE_DISK = 'disk.rescue'
RESCUE_SPEC = 'spec.rescue.json'


def spec_path(vmdir):
    return os.path.join(vmdir.path, RESCUE_SPEC)


def disk_path(vmdir):
    return vmdir.disk(RESCUE_DISK)


def is_rescued(vmdir):
    return os.path.exists(spec_path(vmdir))


def build_spec(spec, rescue_spec_base):
    """The rescue VM: ``rescue_spec_base`` (a guest.build() of the instance
    booting the rescue disk) + the instance's own disks after it."""
    rescue = copy.deepcopy(rescue_spec_base)
    rescue.disks = rescue.disks[:1] + copy.deepcopy(spec.disks)
    rescue.nics = copy.deepcopy(spec.nics)
    return rescue


def save_spec(vmdir, rescue_spec):
    instance_store.write_spec(vmdir, rescue_spec, RESCUE_SPEC)


def load_spec(vmdir):
    return instance_store.read_spec(vmdir, RESCUE_SPEC)


def remove(vmdir):
    """Remove the rescue spec and disk (the rescue VM must be stopped)."""
    for path in (spec_path(vmdir), disk_path(vmdir)):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
