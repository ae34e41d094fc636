"""Live-migration convergence policy (hypervisor-neutral, pure Python).

The orchestration polls the running migration (about every 0.5 s) and hands
the numbers to :meth:`ConvergencePolicy.decide` as a :class:`Progress`; the
policy answers with the :class:`Step` s to apply (raise the allowed downtime,
throttle the vCPUs, switch to post-copy, abort). Mapping a Step onto a
hypervisor is somebody else's job (QEMU: hypervisor/qemu/migration_params.py).
docs/migration.md, "Live migration: convergence policy", has the derivation
and the numbers behind every constant below.

The model. A pre-copy pass sends what the previous pass left dirty. A pass of
``t`` seconds leaves ``dirty_rate * t`` bytes for the next one (the guest's
writable working set caps it), and that next pass lasts ``remaining /
bandwidth``. So each pass leaves ``rho = dirty_rate / bandwidth`` times what
the one before left:

* ``rho < 1 - MARGIN``: the remainder shrinks geometrically and reaches
  ``bandwidth * downtime`` after ``log(F / (B*L)) / log(1/rho)`` passes;
  nothing to do (unless that takes more than MAX_TAIL_ROUNDS passes: then the
  downtime is raised to the level reached after MAX_TAIL_ROUNDS passes).
* otherwise the remainder stays at (or grows to) the fixpoint
  ``F = dirty_rate * pass_time`` (at most the working set): the migration can
  finish only with a downtime of ``F / bandwidth``. The policy jumps straight
  to the smallest configured downtime level that covers it (levels are
  ``live_migration_downtime`` .. ``live_migration_downtime_max`` in
  ``live_migration_downtime_steps`` equal steps), never above the maximum;
  when even the maximum does not cover it (after giving the maximum one
  pass), it applies ``live_migration_fallback``: throttle the vCPUs in steps
  (the first one computed to bring ``rho`` below ``1 - MARGIN``, at least
  THROTTLE_INITIAL percent; each further one at least twice the previous
  increment, since a working set that caps the measured dirty rate makes the
  estimate low), switch to post-copy, or abort.

Bandwidth: the bytes sent since the previous pass's sample divided by the
time between them (QEMU: ram 'transferred'), when that spans at least
MIN_SPAN seconds; the hypervisor's own instantaneous figure (QEMU's 'mbps',
the rate of its last 100 ms window) only otherwise. Sampled right after a
bitmap sync, that window mostly covers the sync itself and reads low (the
benchmark saw 8.6-9.6 MiB/s on a 32 MiB/s link that moved 466 MiB in
14.6 s), which made a converging guest look like one that never would.

Noise: the dirty rate and bandwidth are the medians of the last WINDOW
passes, the expected downtime gets HEADROOM, the downtime and the throttle
only ever go up (no flapping by construction), a throttle is given
SETTLE_ROUNDS passes to show its effect before the next one, and post-copy or
abort needs the maximum downtime to have failed for one full pass.

The completion timeout (``live_migration_completion_timeout`` seconds per GiB
of data to move) aborts a migration still in pre-copy, whatever the
fallback; after the switch to post-copy there is nothing left to abort (the
guest runs on the destination) and the policy only reports.
"""
import dataclasses
import logging
import math
import statistics

LOG = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB

#: passes whose medians are used (a single odd sample cannot move them)
WINDOW = 3
#: a pass converges if the dirty rate is below (1 - MARGIN) * bandwidth
MARGIN = 0.2
#: the downtime chosen covers HEADROOM x the estimated final remainder
HEADROOM = 1.25
#: a converging migration needing more passes than this gets more downtime
MAX_TAIL_ROUNDS = 10
#: vCPU throttle: first step, step size, most (QEMU's own maximum is 99)
THROTTLE_INITIAL = 20
THROTTLE_STEP = 10
THROTTLE_MAX = 99
#: passes a throttle gets to show its effect before the next step
SETTLE_ROUNDS = 2
#: seconds between samples below which the sent-bytes rate is not trusted
MIN_SPAN = 1.0

FALLBACKS = ('auto-converge', 'post-copy', 'abort')


@dataclasses.dataclass
class Progress:
    """One poll of a running migration. QEMU: ``rounds`` is ram
    'dirty-sync-count', ``dirty_rate`` ram 'dirty-pages-rate' * 'page-size'
    (pages found dirty at each sync, summed over windows of >= 1 s),
    ``bandwidth`` ram 'mbps' * 1e6 / 8."""
    elapsed: float          # s since the migration started
    rounds: int             # pre-copy passes completed
    memory_total: int       # bytes
    memory_processed: int   # bytes sent
    memory_remaining: int   # bytes left
    dirty_rate: float       # bytes/s dirtied
    bandwidth: float        # bytes/s achieved
    disk_remaining: int = 0  # bytes the block mirror still has to copy
    #: vCPU throttle in effect, if the hypervisor reports it (QEMU:
    #: query-migrate 'cpu-throttle-percentage'); None: the policy assumes its
    #: last throttle step is in effect SETTLE_ROUNDS passes after it.
    cpu_throttle: int | None = None


@dataclasses.dataclass
class Step:
    kind: str               # 'downtime' | 'throttle' | 'postcopy' | 'abort'
    value: int | None       # ms for downtime, percent for throttle
    reason: str             # log line with the numbers behind the decision


def downtime_levels(initial_ms, max_ms, steps):
    """The allowed downtimes: ``initial_ms`` .. ``max_ms`` in ``steps``
    equal steps (ms, ascending, no duplicates)."""
    levels = []
    for k in range(steps + 1):
        ms = int(round(initial_ms + (max_ms - initial_ms) * k / steps))
        if not levels or ms > levels[-1]:
            levels.append(ms)
    return levels


def throttle_levels():
    levels = list(range(THROTTLE_INITIAL, THROTTLE_MAX, THROTTLE_STEP))
    return levels + [THROTTLE_MAX]


def _mib(n):
    return n / MiB


@dataclasses.dataclass
class _Sample:
    elapsed: float
    rounds: int
    round_time: float       # s per pass since the previous sample
    dirty_rate: float
    bandwidth: float
    remaining: int
    disk_remaining: int


class ConvergencePolicy:
    """Decides, pass by pass, what a live migration needs to finish."""

    def __init__(self, initial_downtime_ms, downtime_max_ms, downtime_steps,
                 fallback, completion_timeout_s, bandwidth_cap=0):
        """``completion_timeout_s`` 0 = none; ``bandwidth_cap`` bytes/s
        (0 = none) stands in for the bandwidth until one is measured."""
        if fallback not in FALLBACKS:
            raise ValueError('live_migration_fallback must be one of %s, '
                             'not %r' % (', '.join(FALLBACKS), fallback))
        if downtime_max_ms < initial_downtime_ms:
            raise ValueError(
                'live_migration_downtime_max (%d ms) is below '
                'live_migration_downtime (%d ms): the policy would have to '
                'allow more downtime than the maximum' % (
                    downtime_max_ms, initial_downtime_ms))
        if downtime_steps < 1:
            raise ValueError('live_migration_downtime_steps must be >= 1, '
                             'not %d' % downtime_steps)
        self.initial_downtime_ms = int(initial_downtime_ms)
        self.downtime_max_ms = int(downtime_max_ms)
        self.levels = downtime_levels(self.initial_downtime_ms,
                                      self.downtime_max_ms, downtime_steps)
        self.fallback = fallback
        self.completion_timeout_s = float(completion_timeout_s)
        self.bandwidth_cap = float(bandwidth_cap)
        self.wants_postcopy = fallback == 'post-copy'
        self.wants_auto_converge = fallback == 'auto-converge'

        self.downtime_ms = self.initial_downtime_ms
        self.throttle = 0
        self.samples = []
        self.decisions = []         # every decision's log line, in order
        self.finished = False       # abort or post-copy issued
        self.postcopy_started = False
        self._last_rounds = 0
        self._last_elapsed = 0.0
        self._last_processed = 0
        # passes count when the downtime reached the maximum
        self._at_max_since = (0 if self.downtime_ms >= self.downtime_max_ms
                              else None)
        self._throttled_at = None   # rounds of the last throttle step
        self._throttle_steps = 0

    @classmethod
    def from_conf(cls, conf_group, data_bytes, bandwidth_mibps):
        """``conf_group`` = CONF.bhyve; ``data_bytes`` = guest memory plus,
        for a block migration, the disks; ``bandwidth_mibps`` = the cap Nova
        passes for this migration (0/None: live_migration_bandwidth)."""
        cap_mibps = bandwidth_mibps or conf_group.live_migration_bandwidth
        timeout = (conf_group.live_migration_completion_timeout
                   * data_bytes / GiB)
        initial = conf_group.live_migration_downtime
        maximum = conf_group.live_migration_downtime_max
        if initial > maximum:
            # e.g. a maximum below the 300 ms default start, set before
            # that default was raised from 50 ms: start at the maximum
            LOG.warning('live_migration_downtime (%d ms) is above '
                        'live_migration_downtime_max (%d ms): live '
                        'migrations start at the maximum', initial, maximum)
            initial = maximum
        return cls(initial, maximum,
                   conf_group.live_migration_downtime_steps,
                   conf_group.live_migration_fallback,
                   timeout, (cap_mibps or 0) * MiB)

    # -- decisions ------------------------------------------------------

    def _record(self, progress, step=None, text=None):
        line = text if step is None else step.reason
        self.decisions.append(line)
        LOG.info('%s', line)
        return [step] if step is not None else []

    def decide(self, progress):
        """The Steps to apply now (usually none). Call on every poll; only a
        new pass (``progress.rounds`` grew) or the timeout leads to one."""
        if self.finished:
            return []
        if (self.completion_timeout_s
                and progress.elapsed >= self.completion_timeout_s):
            return self._timeout(progress)
        if progress.rounds <= self._last_rounds:
            return []
        self._add_sample(progress)
        return self._decide_round(progress)

    def _add_sample(self, p):
        passes = p.rounds - self._last_rounds
        span = max(p.elapsed - self._last_elapsed, 0.0)
        round_time = span / passes
        sent = p.memory_processed - self._last_processed
        bandwidth = (sent / span if span >= MIN_SPAN and sent > 0
                     else max(p.bandwidth, 0.0))
        self._last_rounds, self._last_elapsed = p.rounds, p.elapsed
        self._last_processed = p.memory_processed
        self.samples.append(_Sample(p.elapsed, p.rounds, round_time,
                                    max(p.dirty_rate, 0.0), bandwidth,
                                    p.memory_remaining, p.disk_remaining))
        del self.samples[:-WINDOW]

    def _estimates(self):
        """(dirty rate, bandwidth, fixpoint) from the last WINDOW passes:
        medians, so one odd sample cannot move them."""
        dirty = statistics.median(s.dirty_rate for s in self.samples)
        measured = [s.bandwidth for s in self.samples if s.bandwidth > 0]
        bandwidth = (statistics.median(measured) if measured
                     else self.bandwidth_cap)
        fixpoint = statistics.median(s.dirty_rate * s.round_time
                                     for s in self.samples)
        return dirty, bandwidth, fixpoint

    def _level_for(self, need_ms):
        """Smallest downtime level covering ``need_ms``, or None."""
        for ms in self.levels:
            if ms >= need_ms:
                return ms
        return None

    def _numbers(self, p, dirty, bandwidth, fixpoint, rho):
        now_ms = ((p.memory_remaining + p.disk_remaining) / bandwidth * 1000
                  if bandwidth else float('inf'))
        return ('live migration pass %d at %.1f s: remaining %.1f MiB '
                '(disk %.1f MiB), dirty rate %.1f MiB/s, bandwidth %.1f MiB/s '
                '(medians of %d passes), dirty/bandwidth %.2f, fixpoint '
                '%.1f MiB, downtime if stopped now %.0f ms, allowed %d ms, '
                'throttle %d%%' % (
                    p.rounds, p.elapsed, _mib(p.memory_remaining),
                    _mib(p.disk_remaining), _mib(dirty), _mib(bandwidth),
                    len(self.samples), rho, _mib(fixpoint), now_ms,
                    self.downtime_ms, self.throttle))

    def _decide_round(self, p):
        dirty, bandwidth, fixpoint = self._estimates()
        if bandwidth <= 0:
            return self._record(p, text=(
                'live migration pass %d at %.1f s: no bandwidth measured '
                'yet: holding' % (p.rounds, p.elapsed)))
        rho = dirty / bandwidth
        numbers = self._numbers(p, dirty, bandwidth, fixpoint, rho)
        disk_ms = p.disk_remaining / bandwidth * 1000

        if rho < 1 - MARGIN:
            return self._converging(p, numbers, rho, fixpoint, bandwidth,
                                    disk_ms)

        # The remainder stays at the fixpoint, or grows by rho per pass up
        # to the guest's memory: what the next pass will leave.
        final = min(fixpoint * rho, p.memory_total or fixpoint * rho)
        need_ms = final / bandwidth * 1000 * HEADROOM + disk_ms
        target = self._level_for(need_ms)
        if target is not None:
            if target > self.downtime_ms:
                return self._raise(p, target, numbers + (
                    '; not converging (dirty rate above %d%% of bandwidth): '
                    'next pass leaves %.1f MiB, needs %.0f ms downtime: '
                    'downtime %d -> %d ms' % (
                        (1 - MARGIN) * 100, _mib(final), need_ms,
                        self.downtime_ms, target)))
            return self._record(p, text=numbers + (
                '; not converging but the allowed %d ms covers the needed '
                '%.0f ms: holding' % (self.downtime_ms, need_ms)))

        # Even the maximum downtime is not enough.
        if self.downtime_ms < self.downtime_max_ms:
            return self._raise(p, self.downtime_max_ms, numbers + (
                '; not converging: needs %.0f ms downtime, more than the '
                'maximum: downtime %d -> %d ms (maximum) before the '
                'fallback (%s)' % (need_ms, self.downtime_ms,
                                   self.downtime_max_ms, self.fallback)))
        if disk_ms > self.downtime_max_ms:
            return self._record(p, text=numbers + (
                '; the disk mirror still has %.1f MiB to copy (%.0f ms at '
                'this bandwidth): holding the fallback until it catches up'
                % (_mib(p.disk_remaining), disk_ms)))
        if p.rounds - self._at_max_since < 1:
            return self._record(p, text=numbers + (
                '; needs %.0f ms, at the maximum %d ms since this pass: '
                'giving it one pass' % (need_ms, self.downtime_max_ms)))
        return self._fallback(p, numbers, need_ms, dirty, bandwidth)

    def _converging(self, p, numbers, rho, fixpoint, bandwidth, disk_ms):
        if self.throttle and self._throttled_at is not None:
            numbers += ' (converging under the throttle)'
        limit = bandwidth * self.downtime_ms / 1000
        if fixpoint <= limit or rho <= 0:
            return self._record(p, text=numbers + (
                '; converging: holding at %d ms' % self.downtime_ms))
        passes = math.log(fixpoint / limit) / math.log(1 / rho)
        if (passes <= MAX_TAIL_ROUNDS
                or self.downtime_ms >= self.downtime_max_ms):
            return self._record(p, text=numbers + (
                '; converging: about %.0f more passes at %d ms: holding'
                % (passes, self.downtime_ms)))
        need_ms = (fixpoint * rho ** MAX_TAIL_ROUNDS / bandwidth * 1000
                   * HEADROOM + disk_ms)
        target = self._level_for(need_ms) or self.downtime_max_ms
        if target <= self.downtime_ms:
            return self._record(p, text=numbers + (
                '; converging: about %.0f more passes: holding' % passes))
        return self._raise(p, target, numbers + (
            '; converging slowly: about %.0f more passes at %d ms; %d ms '
            'is reached within %d: downtime %d -> %d ms' % (
                passes, self.downtime_ms, target, MAX_TAIL_ROUNDS,
                self.downtime_ms, target)))

    def _raise(self, p, target, reason):
        self.downtime_ms = target
        if target >= self.downtime_max_ms and self._at_max_since is None:
            self._at_max_since = p.rounds
        return self._record(p, Step('downtime', target, reason))

    def _fallback(self, p, numbers, need_ms, dirty, bandwidth):
        why = ('needs %.0f ms downtime, more than the maximum %d ms '
               '(live_migration_downtime_max)' % (need_ms,
                                                  self.downtime_max_ms))
        if self.fallback == 'post-copy':
            self.finished = self.postcopy_started = True
            return self._record(p, Step('postcopy', None, numbers + (
                '; %s: switching to post-copy (live_migration_fallback)'
                % why)))
        if self.fallback == 'abort':
            self.finished = True
            return self._record(p, Step('abort', None, (
                'live migration aborted: it cannot converge: the guest '
                'dirties %.1f MiB/s and the link carries %.1f MiB/s, so '
                'finishing %s; live_migration_fallback = abort. The '
                'instance keeps running on the source. ' % (
                    _mib(dirty), _mib(bandwidth), why)) + numbers))
        return self._throttle(p, numbers, why, dirty, bandwidth)

    def _throttle(self, p, numbers, why, dirty, bandwidth):
        in_effect = p.cpu_throttle if p.cpu_throttle is not None else (
            self.throttle if self._throttled_at is not None
            and p.rounds - self._throttled_at >= SETTLE_ROUNDS else 0)
        if (self._throttled_at is not None
                and p.rounds - self._throttled_at < SETTLE_ROUNDS):
            return self._record(p, text=numbers + (
                '; %s; throttle %d%% set at pass %d: letting it settle' % (
                    why, self.throttle, self._throttled_at)))
        if self.throttle >= THROTTLE_MAX:
            return self._record(p, text=numbers + (
                '; %s; the throttle is at its maximum %d%%: waiting for '
                'convergence or the completion timeout' % (
                    why, THROTTLE_MAX)))
        # Dirtying scales with the vCPU time the guest gets.
        unthrottled = dirty / max(1 - in_effect / 100, 0.01)
        wanted = 100 * (1 - bandwidth * (1 - MARGIN) / unthrottled)
        # The estimate is low when the working set caps the measured rate:
        # each step that did not do it doubles the next increment.
        floor = self.throttle + THROTTLE_STEP * 2 ** self._throttle_steps
        if not self.throttle:
            floor = THROTTLE_INITIAL
        target = next((t for t in throttle_levels()
                       if t >= wanted and t >= floor), THROTTLE_MAX)
        self._throttle_steps += 1
        previous, self.throttle = self.throttle, target
        self._throttled_at = p.rounds
        return self._record(p, Step('throttle', target, numbers + (
            '; %s: vCPU throttle %d -> %d%% (unthrottled dirty rate %.1f '
            'MiB/s needs %.0f%% to fall below %d%% of the bandwidth)' % (
                why, previous, target, _mib(unthrottled), wanted,
                (1 - MARGIN) * 100))))

    def _timeout(self, p):
        if self.postcopy_started:
            return []
        self.finished = True
        last = ''
        if self.samples:
            dirty, bandwidth, _ = self._estimates()
            last = (' Last pass %d: %.1f MiB left, dirty rate %.1f MiB/s, '
                    'bandwidth %.1f MiB/s, downtime allowed %d ms, throttle '
                    '%d%%.' % (p.rounds, _mib(p.memory_remaining),
                               _mib(dirty), _mib(bandwidth), self.downtime_ms,
                               self.throttle))
        return self._record(p, Step('abort', None, (
            'live migration aborted: not finished within its completion '
            'timeout of %.0f s (live_migration_completion_timeout per GiB '
            'of data to move); the instance keeps running on the source.%s'
            % (self.completion_timeout_s, last))))
