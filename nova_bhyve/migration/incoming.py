"""The destination's incoming VM of a live migration, as files.

An incoming VM lives in the instance directory (block migration) or, on a
shared instances path, in a runtime directory inside it (``runtime_dir``),
apart from the source VM that still uses the instance directory. A marker
file names the host receiving it: on shared storage other hosts see it too.
"""
import os

from nova_bhyve.hypervisor import base

#: marker file of a VM directory that holds an incoming migration
MARKER = 'incoming'


def runtime_dir(vmdir):
    """Shared instances path: the incoming VM's own pid file, sockets,
    console log and spec, apart from the source VM's (which uses the same
    instance directory until it is gone)."""
    # short: unix socket paths are limited to 108 bytes; the name is also
    # the marker VMDir.uuid gives pid checks, so it carries part of the uuid
    return base.VMDir(os.path.join(vmdir.path, 'in-' + vmdir.uuid[:8]))


def mark(vm, host_name):
    """Mark ``vm`` (a VMDir) as receiving a migration on ``host_name``."""
    with open(os.path.join(vm.path, MARKER), 'w') as f:
        f.write(host_name)


def unmark(vm):
    try:
        os.unlink(os.path.join(vm.path, MARKER))
    except FileNotFoundError:
        pass


def is_marked(vm):
    return os.path.exists(os.path.join(vm.path, MARKER))


def receiving_host(vm):
    """The host the marker of ``vm`` names (None: none, or unreadable)."""
    try:
        with open(os.path.join(vm.path, MARKER)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def is_incoming(vmdir):
    return is_marked(vmdir) or os.path.isdir(runtime_dir(vmdir).path)
