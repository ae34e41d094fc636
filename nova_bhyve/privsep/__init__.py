"""How nova-bhyve's few root operations leave the unprivileged nova-compute.

nova-compute runs as an unprivileged user. The operations that need root
(creating and deleting taps, bridges and OVS ports: ``nova_bhyve.privsep.net``)
run in another process, and only those functions, with arguments each one
checks itself, cross the boundary - never a command line. Two transports
carry the same calls:

``privsep`` (Linux, the default there)
    An oslo.privsep context of this project's own, ``[nova_bhyve_privileged]``
    in nova.conf. Its daemon keeps CAP_NET_ADMIN (links, taps, bridges) and
    CAP_DAC_OVERRIDE (the OVSDB socket, /proc/sys) and drops every other
    capability. oslo.privsep starts it as ``privsep-helper`` through the
    root helper (``[nova_bhyve_privileged] helper_command``, or nova's
    rootwrap with etc/nova-bhyve/rootwrap.d/nova-bhyve.filters).

A nova-compute that runs as root (the tests, the demo) has nothing to
cross: the functions run in-process, as Nova's PrivsepFixture arranges for
Nova's own contexts in its tests. (Forking the daemon from an
eventlet-patched nova-compute hung its hub; unprivileged deployments use
the privsep-helper path Nova itself uses.)

``helper`` (FreeBSD, the default there)
    oslo.privsep is built on Linux capabilities (capset(2), prctl(2)), which
    FreeBSD does not have - the reason earlier attempts at FreeBSD compute
    nodes ran nova-compute as root. Here each call runs
    ``[bhyve] privileged_helper_command`` (by default ``sudo
    nova-bhyve-privhelper``) with the function's name and its arguments as
    JSON. The helper knows only the functions registered below and runs the
    same argument checks, so the sudoers/doas rule for it grants exactly
    those operations and no shell (etc/nova-bhyve/sudoers.d/nova-bhyve).

The transport is ``[bhyve] privileged_transport`` (``auto`` picks by OS).
"""
import functools
import json
import os
import shlex
import sys

from oslo_concurrency import processutils
from oslo_privsep import capabilities as caps
from oslo_privsep import priv_context

from nova_bhyve import conf

CONF = conf.CONF

net_admin = priv_context.PrivContext(
    'nova_bhyve',
    cfg_section='nova_bhyve_privileged',
    pypath=__name__ + '.net_admin',
    capabilities=[caps.CAP_NET_ADMIN, caps.CAP_DAC_OVERRIDE],
)

#: name -> the unwrapped function, for the helper transport
ENTRYPOINTS = {}

#: exit status of the helper for arguments a function refused
EXIT_REFUSED = 2


class Refused(ValueError):
    """A privileged function refused its arguments (raised on both sides:
    the checks run where the privilege is)."""


def transport():
    choice = CONF.bhyve.privileged_transport
    if choice == 'auto':
        return 'helper' if sys.platform.startswith('freebsd') else 'privsep'
    return choice


def entrypoint(func):
    """Make ``func`` run in the privileged process of the transport in
    use."""
    through_daemon = net_admin.entrypoint(func)
    ENTRYPOINTS[func.__name__] = func

    @functools.wraps(func)
    def call(*args):
        if transport() == 'helper':
            return _through_helper(func.__name__, args)
        if os.geteuid() == 0:
            return func(*args)      # already privileged: nothing to cross
        return through_daemon(*args)
    # the daemon runs what the module attribute is, if it is an entrypoint
    # of this context
    setattr(call, priv_context._ENTRYPOINT_ATTR,
            getattr(through_daemon, priv_context._ENTRYPOINT_ATTR))
    return call


def _through_helper(name, args):
    cmd = shlex.split(CONF.bhyve.privileged_helper_command)
    try:
        out, _ = processutils.execute(*cmd, name, json.dumps(list(args)))
    except processutils.ProcessExecutionError as e:
        if e.exit_code == EXIT_REFUSED:
            raise Refused((e.stderr or '').strip()) from None
        raise
    return json.loads(out) if out.strip() else None
