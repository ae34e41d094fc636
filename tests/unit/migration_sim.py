"""A small simulator of pre-copy live migration, to drive a convergence
controller (nova_bhyve.migration.policy.ConvergencePolicy or a baseline
below) the way the orchestration does: a Progress every POLL seconds, the
Steps it returns applied to the simulated migration.

The model follows QEMU 7.2's RAM migration (migration/ram.c, migration.c):

* a pass sends the pages dirtied before its start at ``bandwidth``; the
  guest dirties ``dirty_rate * (1 - throttle)`` bytes/s meanwhile, distinct
  pages capped by its writable working set;
* the end of a pass is a bitmap sync: 'dirty-sync-count' + 1; the reported
  dirty rate is recomputed only over windows of at least 1 s (as QEMU's
  migration_update_rates) as the sum of the pages each sync found dirty, so
  short passes report the last window's rate and a page dirtied again in
  every pass counts once per pass;
* the migration completes (guest stopped) as soon as what is left, pages to
  send plus pages dirtied since the sync, fits in ``bandwidth * downtime
  limit``; the downtime is that amount / bandwidth;
* a throttle step takes effect at the second sync after it is requested
  (QEMU's dirty_rate_high_cnt needs two triggering syncs);
* post-copy: the guest moves at once (downtime ~0 here) and the rest is
  sent at ``bandwidth``.

It is a model, not QEMU: it has no per-page granularity, no compression, no
zero-page skipping; ``noise`` multiplies the *reported* dirty rate and
bandwidth by a factor drawn uniformly from [1 - noise, 1 + noise] (seeded),
the true ones stay constant.
"""
import dataclasses
import random

from nova_bhyve.migration import policy as migration_policy

MiB = migration_policy.MiB
GiB = migration_policy.GiB
POLL = 0.5
DT = 0.01


@dataclasses.dataclass
class Result:
    outcome: str            # 'completed' | 'aborted' | 'unfinished'
    elapsed: float          # s until completion / abort / end of simulation
    downtime_ms: float      # guest pause at completion (0 unless completed)
    max_downtime_limit: int  # highest downtime limit ever set (ms)
    postcopy: bool
    max_throttle: int
    steps: list             # every Step, in order
    passes: int


def simulate(controller, memory, dirty_rate, bandwidth, working_set=None,
             noise=0.0, seed=1, max_time=4000.0, disk=0):
    """Run ``controller`` (has initial_downtime_ms and decide(progress)) on a
    guest with ``memory`` bytes dirtying ``dirty_rate`` bytes/s (distinct
    pages capped at ``working_set``) over a link of ``bandwidth`` bytes/s.
    ``disk``: bytes a block mirror copies first (sharing the link)."""
    rnd = random.Random(seed)
    working_set = memory if working_set is None else working_set
    limit_ms = controller.initial_downtime_ms
    max_limit = limit_ms
    t = 0.0
    to_send = float(memory)          # the bulk pass
    dirty = 0.0                      # dirtied since the last sync
    disk_left = float(disk)
    passes = 0
    rate_window_start, rate_window_dirty = 0.0, 0.0
    reported_rate = 0.0
    throttle = requested = 0
    throttle_syncs = 0
    steps = []
    next_poll = POLL
    postcopy = False
    sent_total = 0.0

    def factor():
        return 1 + noise * rnd.uniform(-1, 1) if noise else 1.0

    while t < max_time:
        t += DT
        budget = bandwidth * DT
        if disk_left > 0:
            used = min(disk_left, budget)
            disk_left -= used
            budget -= used
        sent = min(to_send, budget)
        to_send -= sent
        sent_total += sent
        new_dirty = dirty_rate * (1 - throttle / 100) * DT
        dirty = min(working_set, dirty + new_dirty)
        if postcopy:
            dirty = 0.0              # the guest runs on the destination
            if to_send <= 0:
                return Result('completed', t, 0.0, max_limit, True,
                              throttle, steps, passes)
            continue
        left = to_send + dirty + disk_left
        if passes >= 1 and left <= bandwidth * limit_ms / 1000:
            return Result('completed', t, left / bandwidth * 1000,
                          max_limit, False, throttle, steps, passes)
        if to_send <= 0:             # end of pass: bitmap sync
            passes += 1
            rate_window_dirty += dirty   # QEMU sums each sync's new pages
            if t - rate_window_start >= 1.0:
                reported_rate = rate_window_dirty / (t - rate_window_start)
                rate_window_start, rate_window_dirty = t, 0.0
            to_send, dirty = dirty, 0.0
            if requested > throttle:
                throttle_syncs += 1
                if throttle_syncs >= 2:
                    throttle, throttle_syncs = requested, 0
        if t + 1e-9 >= next_poll:
            next_poll += POLL
            progress = migration_policy.Progress(
                elapsed=t, rounds=passes, memory_total=memory,
                memory_processed=int(sent_total),
                memory_remaining=int(to_send),
                dirty_rate=reported_rate * factor(),
                bandwidth=bandwidth * factor(),
                disk_remaining=int(disk_left))
            for step in controller.decide(progress):
                steps.append(step)
                if step.kind == 'downtime':
                    limit_ms = step.value
                    max_limit = max(max_limit, limit_ms)
                elif step.kind == 'throttle':
                    requested = step.value
                elif step.kind == 'postcopy':
                    postcopy = True
                    to_send, dirty = to_send + dirty, 0.0
                elif step.kind == 'abort':
                    return Result('aborted', t, 0.0, max_limit, False,
                                  throttle, steps, passes)
    return Result('unfinished', t, 0.0, max_limit, postcopy, throttle,
                  steps, passes)


class QemuDefaults:
    """QEMU's own behaviour: 300 ms downtime limit, no auto-converge, no
    timeout (the simulation's max_time ends it)."""
    initial_downtime_ms = 300

    def decide(self, progress):
        return []


class LibvirtStepping:
    """Nova's libvirt driver defaults: downtime raised from 50 to 500 ms in
    10 steps, one every 75 s x data GiB (data GiB at least 2), abort at
    800 s x data GiB (nova/virt/libvirt/migration.py downtime_steps,
    driver.py _live_migration_data_gb / completion timeout)."""

    def __init__(self, memory, downtime=500, steps=10, delay=75,
                 completion_timeout=800):
        data_gb = max(memory / GiB, 2)
        step_delay = delay * data_gb
        base = downtime / steps
        offset = (downtime - base) / steps
        self.schedule = [(step_delay * i, int(base + offset * i))
                         for i in range(steps + 1)]
        self.initial_downtime_ms = self.schedule[0][1]
        self.timeout = completion_timeout * data_gb
        self.current = self.initial_downtime_ms

    def decide(self, progress):
        if progress.elapsed >= self.timeout:
            return [migration_policy.Step('abort', None, 'timeout')]
        due = [ms for at, ms in self.schedule if progress.elapsed >= at]
        if due and due[-1] > self.current:
            self.current = due[-1]
            return [migration_policy.Step('downtime', self.current, 'step')]
        return []
