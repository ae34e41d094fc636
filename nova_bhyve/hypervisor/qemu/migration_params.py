"""QMP commands that put a ConvergencePolicy (nova_bhyve.migration.policy)
in charge of a QEMU 7.2 live migration.

Every command and argument here is accepted by QEMU 7.2's QMP schema
(tests/unit/test_qemu_migration_params.py sends each one to a real
``qemu-system-x86_64 -machine none``).

* Capabilities (``migrate-set-capabilities``) cannot change once a migration
  runs, so :func:`initial_qmp` sets all of them before ``migrate``: ``events``
  always (MIGRATION / MIGRATION_PASS events), ``postcopy-ram`` only when the
  fallback is post-copy (the destination needs it too: :func:`incoming_qmp`),
  ``auto-converge`` only when the fallback is auto-converge. Each is set
  explicitly on or off, so a QEMU that migrated before has no leftovers.
* ``downtime-limit`` (ms) starts at the policy's initial downtime; a
  'downtime' Step sets it (a parameter: changeable while migrating).
* ``max-bandwidth`` (bytes/s): the cap, or UNLIMITED_BANDWIDTH when there is
  none. QEMU's default is 128 MiB/s (MAX_THROTTLE), not unlimited, so "no
  cap" has to be said. ``max-postcopy-bandwidth`` gets the cap too.

vCPU throttling. QEMU 7.2 has no command that sets the throttle. With the
``auto-converge`` capability, at each bitmap sync where the bytes dirtied in
the period exceed ``throttle-trigger-threshold`` percent of the bytes sent
(twice in a row), QEMU starts throttling at ``cpu-throttle-initial`` percent,
or, if already throttling, adds ``cpu-throttle-increment`` up to
``max-cpu-throttle`` (migration/ram.c migration_trigger_throttle,
mig_throttle_guest_down). It never lowers the throttle during a migration.
These are parameters, so they can change at any time; the mapping uses them
as a ceiling the policy moves:

* before the policy throttles: ``cpu-throttle-initial`` = ``max-cpu-throttle``
  = 1 (the smallest values QEMU accepts: it cannot be told "never"), so
  QEMU's own trigger can take at most 1 % of the guest's CPU;
* a 'throttle' Step of P %: ``cpu-throttle-initial`` = ``max-cpu-throttle``
  = P, ``cpu-throttle-increment`` = 99 and ``throttle-trigger-threshold`` = 1:
  at its next trigger QEMU goes straight to P (from nothing: the initial
  value; from the previous step: +99 capped at P) and no further. The
  trigger needs two syncs in a row with more than 1 % of the sent bytes
  dirtied again: the throttle is in effect about two passes after the Step,
  which is why the policy waits SETTLE_ROUNDS passes before the next one.
  query-migrate's ``cpu-throttle-percentage`` reports what is in effect.

'postcopy' is ``migrate-start-postcopy`` (needs ``postcopy-ram`` on both
sides from the start); 'abort' is ``migrate_cancel`` (the source keeps
running; QEMU refuses nothing here, but cancelling in post-copy would lose the
guest, and the policy never asks for it then).
"""

#: "no cap" for max-bandwidth: 1 PiB/s (QEMU's own default is 128 MiB/s)
UNLIMITED_BANDWIDTH = 1 << 50
#: the smallest throttle QEMU accepts for cpu-throttle-initial/max
THROTTLE_FLOOR = 1
THROTTLE_INCREMENT_MAX = 99


def _capabilities(policy, extra=()):
    caps = [('events', True),
            ('postcopy-ram', bool(policy and policy.wants_postcopy)),
            ('auto-converge', bool(policy and policy.wants_auto_converge))]
    caps += list(extra)
    return ('migrate-set-capabilities',
            {'capabilities': [{'capability': name, 'state': state}
                              for name, state in caps]})


def initial_qmp(policy, bandwidth_bytes_per_s):
    """Commands for the source before ``migrate``. ``bandwidth_bytes_per_s``
    0/None = no cap."""
    bandwidth = int(bandwidth_bytes_per_s or 0) or UNLIMITED_BANDWIDTH
    params = {'downtime-limit': int(policy.initial_downtime_ms),
              'max-bandwidth': bandwidth}
    if policy.wants_postcopy:
        params['max-postcopy-bandwidth'] = (
            0 if bandwidth == UNLIMITED_BANDWIDTH else bandwidth)
    if policy.wants_auto_converge:
        params.update({'cpu-throttle-initial': THROTTLE_FLOOR,
                       'max-cpu-throttle': THROTTLE_FLOOR,
                       'cpu-throttle-increment': THROTTLE_FLOOR,
                       'cpu-throttle-tailslow': False})
    return [_capabilities(policy), ('migrate-set-parameters', params)]


def incoming_qmp(policy):
    """Commands for the destination before ``migrate-incoming``: the
    capabilities that must match the source's (post-copy; ``policy`` None:
    none), and ``late-block-activate``: the destination (started with -S)
    takes its disk images - and, on shared storage, their locks - only at
    ``cont``, not when the memory stream completes, so until the guest runs
    there the source can still take it back (libvirt sets it for the same
    reason)."""
    return [_capabilities(policy, [('late-block-activate', True)])]


def qmp_for_step(step):
    """The QMP commands that apply one migration/policy.py Step."""
    if step.kind == 'downtime':
        return [('migrate-set-parameters',
                 {'downtime-limit': int(step.value)})]
    if step.kind == 'throttle':
        percent = int(step.value)
        if not THROTTLE_FLOOR <= percent <= 99:
            raise ValueError('a vCPU throttle must be 1..99 %%, not %d'
                             % percent)
        return [('migrate-set-parameters',
                 {'cpu-throttle-initial': percent,
                  'max-cpu-throttle': percent,
                  'cpu-throttle-increment': THROTTLE_INCREMENT_MAX,
                  'throttle-trigger-threshold': 1})]
    if step.kind == 'postcopy':
        return [('migrate-start-postcopy', {})]
    if step.kind == 'abort':
        return [('migrate_cancel', {})]
    raise ValueError('unknown migration step %r' % (step.kind,))
