"""bhyve warm and live migration over the FreeBSD-UPB prototype.

NEVER EXERCISED ON A REAL FREEBSD HOST; the commands are pinned by
tests/unit/test_bhyve_migration.py with processutils.execute mocked. Upstream
FreeBSD (13, 14) has no bhyve migration: it exists only as the University
Politehnica of Bucharest prototype (Elena Mihailescu, Darius Mihai, Mihai
Carabas; github.com/FreeBSD-UPB/freebsd-src, FreeBSD reviews D28270 warm,
D30954 live, re-split as the D34717 series), on top of BHYVE_SNAPSHOT. What
follows was read from that prototype's sources (usr.sbin/bhyvectl/bhyvectl.c,
usr.sbin/bhyve/migration.c):

* destination: ``bhyve ... -R HOST<sep>PORT`` with the same configuration
  (memory size, devices) as the source. bhyve binds INADDR_ANY:PORT (HOST,
  the source's address, is only resolved: IPv6 is refused), accepts one
  connection, checks that ``hw.machine``, ``hw.model`` and ``hw.pagesize``
  and the guest memory sizes match, receives memory, vmm kernel state and
  device state, acknowledges, and runs the guest;
* source: ``bhyvectl --vm=NAME --migrate=HOST<sep>PORT`` (warm: the vCPUs
  and devices are paused for the whole transfer) or
  ``--migrate-live=HOST<sep>PORT`` (live: pre-copy in a fixed number of
  rounds, 4 in D30954, of dirty pages; needs wired guest memory, bhyve -S /
  ``memory.wired=true``). bhyvectl only sends the request as a datagram to
  the VM's control socket (/var/run/bhyve/NAME) and exits: the running
  bhyve does the migration. On success it destroys the vmm instance and
  exits with status 0; on failure it resumes the guest and keeps running,
  with the reason only on its stderr (our bhyve.log). There is no progress
  report, no cancel, no bandwidth cap and no downtime limit.

``<sep>`` is ``,`` in the prototype's branches (``--migrate=<host>,<port>``
in bhyvectl's usage text) and ``:`` in the D34717 series (its bhyve parses
``host:port``); it is read from bhyvectl's usage text, and an unknown form
counts as no migration support.

Support detection relies on bhyvectl's usage text only (``bhyvectl --help``
prints it: getopt rejects --help): a build with the prototype lists
``--migrate=`` and, with live migration, ``--migrate-live=`` (both only
under BHYVE_SNAPSHOT). bhyve(8)'s ``-R`` comes from the same patches; it is
not probed separately (a bhyve without it fails to start the destination,
and the error is reported then).

What this means for the convergence policy (nova_bhyve.migration.policy):
none of its Steps can be applied on bhyve: :meth:`BhyveMigration.apply`
raises NotImplementedError for each, :meth:`BhyveMigration.progress` and
:meth:`BhyveMigration.cancel` too, and a bandwidth cap is refused by
:func:`check_request`. Only the completion timeout applies, and only as a
report: when bhyve has not finished within it, :meth:`BhyveMigration.wait`
raises HypervisorError, but the prototype cannot stop the transfer.

Wiring into hypervisor/base.py's live migration interface
(BhyveHypervisor.prepare_incoming / finish_incoming / migrate_to ->
:class:`BhyveOutgoing`): memory only, so a bhyve live migration needs a
shared instances path (a block migration is refused at the pre-checks);
``supports_live_migration`` is claimed only when bhyvectl lists
``--migrate-live=``. The destination's bhyve runs the guest by itself when
the transfer ends (there is no ``-S``): ``finish_incoming`` only checks that
it runs. :class:`BhyveOutgoing` reports no progress and cannot cancel, so the
orchestration runs no convergence steps for it and refuses abort and force
complete (``reports_progress`` / ``can_cancel`` False).
"""
import dataclasses
import ipaddress
import json
import re
import signal
import socket
import time

from oslo_concurrency import processutils

from nova_bhyve import conf
from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.bhyve import config as bhyve_config
from nova_bhyve.hypervisor.bhyve import state as bhyve_state
from nova_bhyve.hypervisor.bhyve import supervisor

CONF = conf.CONF

POLL = 0.5
_MIGRATE_USAGE = re.compile(r'--migrate=<host>\s*([,:])\s*<port>')



class Support:
    """What this host's bhyvectl can do (from its usage text)."""

    def __init__(self, warm=False, live=False, separator=None):
        self.warm = warm
        self.live = live
        self.separator = separator

    def __repr__(self):
        return 'Support(warm=%r, live=%r, separator=%r)' % (
            self.warm, self.live, self.separator)


def detect_support(bhyvectl):
    """Support read from ``bhyvectl --help``; nothing when the usage text
    has no ``--migrate=<host>,<port>`` (or ``:``) line."""
    text = bhyve_state.usage_text(bhyvectl)
    match = _MIGRATE_USAGE.search(text)
    if not match:
        return Support()
    return Support(warm=True, live='--migrate-live=' in text,
                   separator=match.group(1))


def _endpoint(support, host, port):
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise base.HypervisorError(
            'bhyve migration needs an IPv4 address, not %r (the prototype '
            'resolves names but refuses IPv6; give the address)' % (host,))
    if addr.version != 4:
        raise base.HypervisorError(
            'bhyve migration supports IPv4 only; %s is IPv6 '
            '(set [bhyve]live_migration_inbound_addr to an IPv4 address)'
            % host)
    if not 0 < int(port) < 65536:
        raise base.HypervisorError('bad migration port %r' % (port,))
    return '%s%s%d' % (addr, support.separator, int(port))


def check_request(support, live, bandwidth_mibps=0, config_tree=None):
    """Refuse what the prototype cannot do, with the reason.

    ``config_tree``: the source VM's bhyve config (bhyve_config.parse_config),
    for live migration's wired-memory requirement."""
    if not support.warm:
        raise NotImplementedError(
            'this bhyve was built without the migration prototype '
            '(bhyvectl lists no --migrate=): no bhyve migration')
    if live and not support.live:
        raise NotImplementedError(
            'this bhyve has warm migration only (bhyvectl lists no '
            '--migrate-live=): no live migration')
    if bandwidth_mibps:
        raise NotImplementedError(
            'bhyve migration has no bandwidth cap: refusing a migration '
            'capped at %d MiB/s (set no live_migration_bandwidth for bhyve)'
            % bandwidth_mibps)
    if live:
        wired = (config_tree or {}).get('memory.wired', 'false')
        if str(wired).lower() not in ('true', 'yes', 'on', '1'):
            raise NotImplementedError(
                'bhyve live migration needs wired guest memory '
                '(memory.wired=true, bhyve -S), and this VM was started '
                'without it')


def incoming_argv(hyp, support, config_path, source_host, port):
    """Destination: bhyve with the same config, receiving on ``port``."""
    return hyp.bhyve_argv(config_path) + [
        '-R', _endpoint(support, source_host, port)]


def migrate_argv(hyp, support, vm_name, dest_host, port, live):
    """Source: the bhyvectl request that starts the migration."""
    option = '--migrate-live' if live else '--migrate'
    return hyp.bhyvectl_argv(
        vm_name, '%s=%s' % (option, _endpoint(support, dest_host, port)))


class BhyveMigration:
    """A migration started on the source (see the module docstring)."""

    def __init__(self, hyp, vmdir, vm_pid, supervisor_pid):
        self.hyp = hyp
        self.vmdir = vmdir
        self.vm_pid = vm_pid
        self.supervisor_pid = supervisor_pid
        self.done = False

    @classmethod
    def start(cls, hyp, support, vmdir, dest_host, port, live,
              bandwidth_mibps=0):
        with open(hyp.config_path(vmdir)) as f:
            tree = bhyve_config.parse_config(f.read())
        check_request(support, live, bandwidth_mibps, tree)
        name = hyp.vm_name(vmdir)
        vm = hyp.pid(vmdir)
        if vm is None:
            raise base.HypervisorError('instance %s has no bhyve process to '
                                       'migrate' % vmdir.uuid)
        argv = migrate_argv(hyp, support, name, dest_host, port, live)
        sup = hyp.supervisor_pid(vmdir)
        # bhyve exits 0 once migrated: not a reboot for the supervisor
        bhyve_state.signal_process(sup, signal.SIGUSR1)
        try:
            processutils.execute(*argv)
        except processutils.ProcessExecutionError as e:
            bhyve_state.signal_process(sup, signal.SIGUSR2)
            raise base.HypervisorError('%s failed (%d): %s' % (
                ' '.join(argv), e.exit_code, (e.stderr or '').strip()))
        return cls(hyp, vmdir, vm, sup)

    def wait(self, timeout):
        """True once the source bhyve has exited (migrated). After
        ``timeout`` s: HypervisorError; the prototype cannot be stopped, so
        the guest may still be paused or copying on the source."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.finished():
                return True
            time.sleep(POLL)
        raise base.HypervisorError(
            'bhyve has not finished migrating instance %s after %.0f s; the '
            'migration prototype reports no progress and cannot be '
            'cancelled; see %s' % (self.vmdir.uuid, timeout,
                                   self.vmdir.path))

    def finished(self):
        """True once the source bhyve has exited with status 0 (migrated),
        False while it runs; HypervisorError when it exited otherwise."""
        if base.process_alive(self.vm_pid, self.vmdir.uuid):
            return False
        if self.supervisor_pid:
            base.wait_for_exit(self.supervisor_pid, 30, self.vmdir.uuid,
                               poll=POLL)
        status = supervisor.read_exit_status(self.vmdir.path)
        if status is not None and status.get('status') != 0:
            raise base.HypervisorError(
                'bhyve of instance %s exited with status %s during the '
                'migration, see %s' % (self.vmdir.uuid, status.get('status'),
                                       self.vmdir.path))
        self.done = True
        return True

    def failed(self):
        """Give the supervisor its reboot semantics back when the source
        bhyve is still running after a failed migration (the destination
        reported the failure)."""
        if base.process_alive(self.vm_pid, self.vmdir.uuid):
            bhyve_state.signal_process(self.supervisor_pid, signal.SIGUSR2)

    def progress(self):
        raise NotImplementedError(
            'bhyve migration reports no progress (no dirty rate, bandwidth '
            'or remaining memory): the convergence policy cannot run')

    def apply(self, step):
        why = {
            'downtime': 'has no downtime limit (live migration stops the '
                        'guest after a fixed number of rounds)',
            'throttle': 'cannot throttle the guest\'s vCPUs',
            'postcopy': 'has no post-copy',
            'abort': 'cannot cancel a migration once bhyvectl started it',
        }.get(step.kind, 'does not know the step %r' % (step.kind,))
        raise NotImplementedError('bhyve migration ' + why)

    def cancel(self):
        raise NotImplementedError(
            'bhyve migration cannot cancel a migration once bhyvectl '
            'started it')


# -- the base.Hypervisor live migration interface -------------------------

@dataclasses.dataclass
class Endpoint:
    """Where the source's bhyvectl sends the VM (JSON: Nova's
    migrate_data)."""
    host: str
    port: int

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text):
        return cls(**json.loads(text))


def _free_port(host):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def refuse_unsupported(support, block=False, bandwidth_mibps=0):
    """What the prototype cannot do, refused before anything starts (the
    pre-checks and both ends call it). NotImplementedError with the
    reason."""
    check_request(support, True, bandwidth_mibps, {'memory.wired': 'true'})
    if block:
        raise NotImplementedError(
            'bhyve live migration moves memory only (FreeBSD-UPB '
            'prototype): the instance\'s disks must be on an instances path '
            'shared with the destination; a block migration is not possible')


def prepare_incoming(hyp, support, spec, vmdir, address, block):
    """Destination: start bhyve with the VM's config and ``-R ADDR,PORT``
    (first start only: a guest reboot later starts it without) under the
    supervisor; return the Endpoint. ``address`` is this host's inbound
    address: the prototype binds INADDR_ANY and only resolves the host part,
    so the inbound address is given."""
    refuse_unsupported(support, block)
    if hyp.vmm_exists(spec.name):
        raise base.HypervisorError(
            'a bhyve VM named %s already exists on this host' % spec.name)
    _endpoint(support, address, 1)        # IPv4 only: refused before
    port = _free_port(address)
    ep = Endpoint(host=address, port=port)
    tree = bhyve_config.render_config(spec, vmdir)
    path = bhyve_config.write_config(tree, hyp.config_path(vmdir))
    argv = incoming_argv(hyp, support, path, address, port)
    base_argv, first = argv[:-2], argv[-2:]
    try:
        supervisor.spawn(vmdir.path, base_argv, policy='bhyve',
                         first_run_args=first,
                         console_device=bhyve_config.nmdm_pair(spec.uuid)[1],
                         console_keep_bytes=CONF.bhyve
                         .console_log_keep_bytes)
    except RuntimeError as e:
        raise base.HypervisorError(str(e))
    if hyp.pid(vmdir) is None:
        status = supervisor.read_exit_status(vmdir.path)
        raise base.HypervisorError(
            'the incoming bhyve for %s ended at once (%s), see %s' % (
                spec.uuid, status, vmdir.path))
    return ep


def finish_incoming(hyp, vmdir):
    """Destination: bhyve runs the guest itself once the transfer ended;
    check that it is running."""
    if hyp.pid(vmdir) is None:
        raise base.HypervisorError(
            'the incoming bhyve of %s is not running after the migration, '
            'see %s' % (vmdir.uuid, vmdir.path))


class BhyveOutgoing(base.MigrationHandle):
    """base.MigrationHandle over BhyveMigration: no disk copy, one bhyvectl
    request, then the source bhyve's exit is the only signal."""

    reports_progress = False
    can_cancel = False

    def __init__(self, hyp, support, vmdir, endpoint, bandwidth):
        self.hyp = hyp
        self.support = support
        self.vmdir = vmdir
        self.endpoint = endpoint
        self.bandwidth = bandwidth
        self.migration = None
        self.status = 'none'
        self.error = None
        mibps = max(1, int(bandwidth) // (1024 * 1024)) if bandwidth else 0
        refuse_unsupported(support, bandwidth_mibps=mibps)

    def start_mirror(self):
        """Nothing to copy (shared storage)."""

    def mirror_ready(self):
        return True

    def start_memory(self):
        self.migration = BhyveMigration.start(
            self.hyp, self.support, self.vmdir, self.endpoint.host,
            self.endpoint.port, live=True)
        self.status = 'active'

    def poll(self):
        """Status only (the prototype reports no counters): 'active' while
        the source bhyve runs, then 'completed' or 'failed'."""
        if self.migration is not None and self.status == 'active':
            try:
                if self.migration.finished():
                    self.status = 'completed'
            except base.HypervisorError as e:
                self.status, self.error = 'failed', str(e)
        return base.MigrationSnapshot(status=self.status, error=self.error)

    def apply(self, step):
        BhyveMigration.apply(None, step)

    def force_complete(self):
        raise NotImplementedError(
            'bhyve migration cannot be forced to complete (the prototype '
            'stops the guest after a fixed number of rounds by itself)')

    def finish(self):
        """Nothing to end: no disk copy."""

    def cancel(self):
        if self.migration is None:
            return               # bhyvectl not run yet: nothing started
        if self.migration.done:
            return
        self.migration.failed()
        raise NotImplementedError(
            'bhyve migration cannot cancel a migration once bhyvectl '
            'started it')
