"""A port's tap shared by two VM processes of one machine, as in a live
migration between two nova-computes of one host (tools/cloud runs two):
the driver's tap is multi-queue, the destination's open attaches beside
the source's, and the tap counts as in use until the last holder closes.
Real taps (root), the driver's own create/open/in_use; no QEMU needed."""
import os
import uuid

import pytest

from nova_bhyve.hypervisor.qemu import resources
from nova_bhyve.net import linux

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason='creating taps needs root')


@pytest.fixture
def tap():
    name = 'nbsh%s' % uuid.uuid4().hex[:8]
    links = linux.LinuxLinks()
    links.create_tap(name, 'fa:16:3e:00:00:02', 1450)
    yield name
    links.delete(name)
    assert not links.exists(name)


def test_two_holders_then_none(tap):
    assert not linux.LinuxLinks.in_use(tap)
    source = resources.open_tap(tap)
    try:
        assert linux.LinuxLinks.in_use(tap)
        destination = resources.open_tap(tap)     # refused if single-queue
        os.close(source)
        source = None
        assert linux.LinuxLinks.in_use(tap)       # the destination holds it
        os.close(destination)
    finally:
        if source is not None:
            os.close(source)
    assert not linux.LinuxLinks.in_use(tap)


def test_a_single_queue_tap_takes_one_holder_only():
    """Why the driver makes its taps multi-queue: the old way refuses the
    second open ("cannot open tap ... Invalid argument" in a live
    migration between two computes of one machine)."""
    name = 'nbsq%s' % uuid.uuid4().hex[:8]
    linux.execute('ip', 'tuntap', 'add', 'dev', name, 'mode', 'tap')
    try:
        first = resources.open_tap(name)
        try:
            with pytest.raises(resources.base.HypervisorError):
                resources.open_tap(name)
        finally:
            os.close(first)
    finally:
        linux.execute('ip', 'link', 'del', 'dev', name)
