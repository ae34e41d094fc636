"""nova_bhyve.migration.policy: the convergence policy driven by simulated
pre-copy migrations (tests/unit/migration_sim.py, a model of QEMU 7.2's RAM
migration) and by hand-written Progress sequences. Pure Python, nothing
mocked: the policy has no I/O."""
import logging
import types

import pytest

from nova_bhyve.migration import policy as mp

import migration_sim as sim

MiB, GiB = sim.MiB, sim.GiB


def policy(fallback='auto-converge', initial=50, maximum=500, steps=5,
           timeout=800 * 1.0, cap=0):
    return mp.ConvergencePolicy(initial, maximum, steps, fallback, timeout,
                                cap)


IDLE = dict(memory=GiB, dirty_rate=1 * MiB, bandwidth=100 * MiB,
            working_set=16 * MiB)
# converges on its own, slowly (rho 0.7)
SLOW = dict(memory=GiB, dirty_rate=70 * MiB, bandwidth=100 * MiB)
# rewrites 40 MiB faster than the link: needs ~400 ms downtime
MEDIUM = dict(memory=GiB, dirty_rate=200 * MiB, bandwidth=100 * MiB,
              working_set=40 * MiB)
# rewrites 512 MiB at 3x the link: no downtime <= 500 ms can do it
HIGH = dict(memory=GiB, dirty_rate=300 * MiB, bandwidth=100 * MiB,
            working_set=512 * MiB)


def downtimes(result):
    return [s.value for s in result.steps if s.kind == 'downtime']


def kinds(result):
    return [s.kind for s in result.steps]


# -- simulated migrations ---------------------------------------------------

def test_idle_guest_converges_at_the_initial_downtime():
    r = sim.simulate(policy(), **IDLE)
    assert r.outcome == 'completed'
    assert r.steps == []
    assert r.downtime_ms <= 50


def test_slowly_converging_guest_is_left_converging():
    r = sim.simulate(policy(), **SLOW)
    assert r.outcome == 'completed'
    assert set(kinds(r)) <= {'downtime'}        # never throttled
    assert r.max_downtime_limit <= 500
    qemu = sim.simulate(sim.QemuDefaults(), **SLOW)
    libvirt = sim.simulate(sim.LibvirtStepping(GiB), **SLOW)
    assert r.elapsed <= min(qemu.elapsed, libvirt.elapsed)


def test_medium_rate_converges_after_raising_the_downtime_never_above_max():
    r = sim.simulate(policy(), **MEDIUM)
    assert r.outcome == 'completed'
    assert kinds(r) and set(kinds(r)) == {'downtime'}
    assert downtimes(r) == sorted(downtimes(r))
    assert all(ms in mp.downtime_levels(50, 500, 5) for ms in downtimes(r))
    assert r.max_downtime_limit <= 500 and r.downtime_ms <= 500
    assert r.elapsed < 60


def test_medium_rate_beats_both_baselines():
    """QEMU's 300 ms never finishes; the libvirt stepping needs its 8th step
    (20 min for a 1 GiB guest): the policy jumps there at once."""
    ours = sim.simulate(policy(), max_time=2000, **MEDIUM)
    qemu = sim.simulate(sim.QemuDefaults(), max_time=2000, **MEDIUM)
    libvirt = sim.simulate(sim.LibvirtStepping(GiB), max_time=2000, **MEDIUM)
    assert qemu.outcome == 'unfinished'
    assert libvirt.outcome == 'completed' and libvirt.elapsed > 1000
    assert ours.outcome == 'completed' and ours.elapsed * 10 < libvirt.elapsed


# the benchmark's converging case: 16 MiB/s into a 32 MiB/s cap (rho 0.5)
BENCH16 = dict(memory=GiB, dirty_rate=16 * MiB, bandwidth=32 * MiB,
               working_set=512 * MiB)


def default_policy():
    from nova_bhyve import conf
    conf.register_opts(conf.CONF) if 'bhyve' not in conf.CONF else None
    return mp.ConvergencePolicy.from_conf(conf.CONF.bhyve, GiB, 0)


@pytest.mark.parametrize('guest', [BENCH16, IDLE, SLOW],
                         ids=['bench16', 'idle', 'slow'])
def test_defaults_never_slower_than_either_baseline(guest):
    """With its default options the policy finishes a converging migration
    no later than QEMU's 300 ms or the libvirt stepping."""
    r = sim.simulate(default_policy(), max_time=2000, **guest)
    qemu = sim.simulate(sim.QemuDefaults(), max_time=2000, **guest)
    libvirt = sim.simulate(sim.LibvirtStepping(GiB), max_time=2000, **guest)
    assert r.outcome == qemu.outcome == libvirt.outcome == 'completed'
    assert r.elapsed <= min(qemu.elapsed, libvirt.elapsed) + 1e-6
    assert r.max_downtime_limit <= 500 and r.downtime_ms <= 500


def test_a_lower_start_costs_what_the_model_says():
    """live_migration_downtime = 50 instead of 300 at rho 0.5: the
    documented price, about (300 - 50) / (1 - 0.5) ms = 0.5 s."""
    low = sim.simulate(policy(initial=50), **BENCH16)
    high = sim.simulate(policy(initial=300), **BENCH16)
    assert low.downtime_ms <= 50 < high.downtime_ms <= 300
    assert 0.3 < low.elapsed - high.elapsed < 0.7


def test_high_rate_auto_converge_throttles_in_steps_and_converges():
    r = sim.simulate(policy('auto-converge'), **HIGH)
    assert r.outcome == 'completed'
    assert r.max_downtime_limit == 500 and r.downtime_ms <= 500
    throttles = [s.value for s in r.steps if s.kind == 'throttle']
    assert len(throttles) >= 2
    assert throttles == sorted(set(throttles))
    # the first step is computed: at least THROTTLE_INITIAL (the dirty rate
    # equals the measured bandwidth here, so 20 % is just on the edge)
    assert mp.THROTTLE_INITIAL <= throttles[0] <= 30
    assert all(t <= mp.THROTTLE_MAX for t in throttles)
    # the downtime reaches its maximum before the first throttle
    assert kinds(r).index('throttle') > downtimes(r).index(500)
    for ctl in (sim.QemuDefaults(), sim.LibvirtStepping(GiB)):
        assert sim.simulate(ctl, max_time=2000, **HIGH).outcome != 'completed'


def test_high_rate_post_copy_switches_once():
    p = policy('post-copy')
    assert p.wants_postcopy and not p.wants_auto_converge
    r = sim.simulate(p, **HIGH)
    assert r.outcome == 'completed' and r.postcopy
    assert kinds(r).count('postcopy') == 1
    assert 'throttle' not in kinds(r) and 'abort' not in kinds(r)
    assert r.max_downtime_limit == 500


def test_high_rate_abort_says_why_with_numbers():
    p = policy('abort')
    assert not p.wants_postcopy and not p.wants_auto_converge
    r = sim.simulate(p, **HIGH)
    assert r.outcome == 'aborted'
    abort = r.steps[-1]
    assert abort.kind == 'abort' and abort.value is None
    assert 'cannot converge' in abort.reason
    assert 'keeps running on the source' in abort.reason
    assert 'live_migration_downtime_max' in abort.reason
    assert 'MiB/s' in abort.reason
    assert r.elapsed < 60          # not waiting for the timeout


def test_timeout_aborts():
    """A 1 GiB guest over 1 MiB/s needs 1024 s for the first pass; the
    timeout is 800 s/GiB."""
    p = policy(timeout=800)
    r = sim.simulate(p, memory=GiB, dirty_rate=0, bandwidth=1 * MiB,
                     max_time=2000)
    assert r.outcome == 'aborted'
    assert 800 <= r.elapsed < 801
    assert 'completion timeout of 800 s' in r.steps[-1].reason
    assert 'keeps running on the source' in r.steps[-1].reason


def test_timeout_aborts_a_throttled_migration_too():
    r = sim.simulate(policy('auto-converge', timeout=30), **HIGH)
    assert r.outcome == 'aborted'
    assert 'throttle' in kinds(r)
    assert 'completion timeout' in r.steps[-1].reason


@pytest.mark.parametrize('seed', range(5))
def test_noise_does_not_make_a_converging_guest_escalate(seed):
    r = sim.simulate(policy(), noise=0.4, seed=seed,
                     memory=GiB, dirty_rate=30 * MiB, bandwidth=100 * MiB,
                     working_set=256 * MiB)
    assert r.outcome == 'completed'
    assert not {'throttle', 'postcopy', 'abort'} & set(kinds(r))


@pytest.mark.parametrize('seed', range(5))
def test_noise_does_not_make_the_downtime_flap(seed):
    r = sim.simulate(policy(), noise=0.4, seed=seed, **MEDIUM)
    assert r.outcome == 'completed'
    assert downtimes(r) == sorted(set(downtimes(r)))   # up only, no repeats
    assert len(downtimes(r)) <= 3
    assert not {'throttle', 'postcopy', 'abort'} & set(kinds(r))


# -- hand-written Progress sequences -----------------------------------------

def progress(elapsed, rounds, remaining, dirty, bandwidth=100 * MiB,
             total=GiB, disk=0, throttle=None):
    return mp.Progress(elapsed=elapsed, rounds=rounds, memory_total=total,
                       memory_processed=total - remaining,
                       memory_remaining=remaining, dirty_rate=dirty,
                       bandwidth=bandwidth, disk_remaining=disk,
                       cpu_throttle=throttle)


def test_bandwidth_from_bytes_sent_not_the_sync_window():
    """The benchmark's case (bench/RESULTS-migration.md): 1 GiB guest
    dirtying 24 MiB/s over a 32 MiB/s cap. QEMU's 'mbps' right after each
    bitmap sync read 8.6-9.6 MiB/s while the link moved 32 MiB/s; taken
    at face value the guest looked like it could never converge and was
    throttled to 70 %. The policy measures the bandwidth from the bytes
    sent between its samples instead."""
    p = policy(initial=300)
    cap = 32 * MiB
    for t, rounds, remaining, dirty, mbps in (
            (19.6, 2, 466 * MiB, 11.8 * MiB, 8.6 * MiB),
            (34.2, 3, 358 * MiB, 23.6 * MiB, 9.6 * MiB),
            (45.5, 4, 270 * MiB, 24.0 * MiB, 9.0 * MiB),
            (54.0, 5, 203 * MiB, 24.0 * MiB, 9.3 * MiB)):
        p.decide(mp.Progress(
            elapsed=t, rounds=rounds, memory_total=GiB,
            memory_processed=int(cap * t), memory_remaining=remaining,
            dirty_rate=dirty, bandwidth=mbps))
    assert not any('not converging' in d for d in p.decisions), p.decisions
    assert p.throttle == 0
    assert 'bandwidth 32.0 MiB/s' in p.decisions[-1]
    # with no bytes-sent counter moving, the hypervisor's figure is used
    q = policy(initial=300)
    q.decide(mp.Progress(elapsed=10, rounds=2, memory_total=GiB,
                         memory_processed=0, memory_remaining=500 * MiB,
                         dirty_rate=20 * MiB, bandwidth=9 * MiB))
    assert 'bandwidth 9.0 MiB/s' in q.decisions[-1]


def test_acts_only_on_new_passes():
    p = policy()
    assert p.decide(progress(10, 1, 400 * MiB, 200 * MiB)) != []
    for t in (10.5, 11.0, 11.5):
        assert p.decide(progress(t, 1, 300 * MiB, 900 * MiB)) == []


def test_one_odd_sample_does_not_escalate():
    """Passes of 1 s at 10 MiB/s dirty; one sample reads 1000 MiB/s."""
    p = policy()
    steps = []
    for r in range(1, 10):
        dirty = 1000 * MiB if r == 5 else 10 * MiB
        steps += p.decide(progress(10 + r, r, 10 * MiB, dirty))
    assert steps == []


def test_jumps_straight_to_the_covering_level():
    """Passes of 0.3 s rewriting 30 MiB over 100 MiB/s (QEMU then reports
    a dirty rate of 100 MiB/s): 300 ms needed x 1.25 headroom -> the 410 ms
    level, in one step."""
    p = policy()
    steps = []
    for r in range(1, 6):
        steps += p.decide(progress(r * 0.3, r, 30 * MiB, 100 * MiB))
    assert [(s.kind, s.value) for s in steps] == [('downtime', 410)]
    assert 'fixpoint 30.0 MiB' in steps[0].reason
    assert 'needs 375 ms' in steps[0].reason


def test_levels():
    assert mp.downtime_levels(50, 500, 5) == [50, 140, 230, 320, 410, 500]
    assert mp.downtime_levels(50, 500, 1) == [50, 500]
    assert mp.downtime_levels(300, 300, 4) == [300]
    assert mp.throttle_levels()[0] == mp.THROTTLE_INITIAL
    assert mp.throttle_levels()[-1] == 99


def test_initial_equal_to_max_goes_to_the_fallback():
    p = policy('abort', initial=300, maximum=300)
    steps = []
    for r in range(1, 6):
        steps += p.decide(progress(r * 5.0, r, 500 * MiB, 100 * MiB))
    assert [s.kind for s in steps] == ['abort']


def test_nothing_after_abort_or_post_copy():
    p = policy('abort', timeout=5)
    assert [s.kind for s in p.decide(progress(6, 1, GiB, 0))] == ['abort']
    assert p.decide(progress(7, 2, GiB, 0)) == []
    q = policy('post-copy', initial=300, maximum=300, timeout=100)
    kinds_ = []
    for r in range(1, 5):
        kinds_ += [s.kind for s in q.decide(
            progress(r * 5.0, r, 500 * MiB, 100 * MiB))]
    assert kinds_ == ['postcopy']
    assert q.decide(progress(200, 9, 100 * MiB, 0)) == []   # no abort


def test_disk_mirror_backlog_holds_the_fallback():
    p = policy('abort', initial=500, maximum=500)
    steps = []
    for r in range(1, 6):
        steps += p.decide(progress(r * 5.0, r, 500 * MiB, 100 * MiB,
                                   disk=5 * GiB))
    assert steps == []
    assert 'disk mirror' in p.decisions[-1]


def test_no_bandwidth_yet_holds():
    p = policy()
    assert p.decide(progress(1, 1, GiB, 100 * MiB, bandwidth=0)) == []
    assert 'no bandwidth' in p.decisions[-1]


def test_reported_throttle_is_used_for_the_unthrottled_rate():
    """At 50 % throttle the guest still dirties 100 MiB/s: unthrottled that
    is 200 MiB/s, needing 60 % -> the 60 % level at least."""
    p = policy('auto-converge', initial=500, maximum=500)
    p.throttle, p._throttled_at, p._throttle_steps = 50, -10, 1
    steps = []
    for r in range(1, 3):          # a second pass: the step settles
        steps += p.decide(progress(r * 5.0, r, 500 * MiB, 100 * MiB,
                                   throttle=50))
    assert [s.kind for s in steps] == ['throttle']
    assert 'unthrottled dirty rate 200.0 MiB/s' in steps[0].reason
    assert steps[0].value >= 60


def test_every_decision_is_logged_with_numbers(caplog):
    caplog.set_level(logging.INFO, logger='nova_bhyve.migration.policy')
    r = sim.simulate(policy(), **MEDIUM)
    assert r.outcome == 'completed'
    lines = [rec.getMessage() for rec in caplog.records]
    assert len(lines) >= r.passes - 1
    assert all('MiB' in line for line in lines)
    assert any('downtime 50 -> ' in line for line in lines)


def test_bad_configuration_is_refused_clearly():
    with pytest.raises(ValueError, match='live_migration_downtime_max'):
        policy(initial=500, maximum=100)
    with pytest.raises(ValueError, match='live_migration_fallback'):
        policy('pause')


def test_from_conf():
    group = types.SimpleNamespace(
        live_migration_downtime=50, live_migration_downtime_max=500,
        live_migration_downtime_steps=5,
        live_migration_fallback='post-copy',
        live_migration_completion_timeout=800,
        live_migration_bandwidth=100)
    p = mp.ConvergencePolicy.from_conf(group, 3 * GiB // 2, 0)
    assert p.initial_downtime_ms == 50
    assert p.completion_timeout_s == 1200
    assert p.bandwidth_cap == 100 * MiB
    assert p.wants_postcopy
    p = mp.ConvergencePolicy.from_conf(group, GiB, 20)
    assert p.bandwidth_cap == 20 * MiB
    group.live_migration_completion_timeout = 0
    p = mp.ConvergencePolicy.from_conf(group, GiB, None)
    assert p.completion_timeout_s == 0
    assert p.decide(progress(10 ** 6, 1, GiB, 0)) == []   # no timeout


def test_from_conf_a_maximum_below_the_start_starts_at_the_maximum(caplog):
    """A live_migration_downtime_max below the 300 ms default start (set
    when the default was 50 ms) must not make every migration fail."""
    group = types.SimpleNamespace(
        live_migration_downtime=300, live_migration_downtime_max=100,
        live_migration_downtime_steps=5,
        live_migration_fallback='post-copy',
        live_migration_completion_timeout=0, live_migration_bandwidth=0)
    with caplog.at_level(logging.WARNING):
        p = mp.ConvergencePolicy.from_conf(group, GiB, 0)
    assert p.initial_downtime_ms == 100 and p.levels == [100]
    assert 'live_migration_downtime_max (100 ms)' in caplog.text


def test_from_real_conf_defaults():
    from nova_bhyve import conf
    conf.register_opts(conf.CONF) if 'bhyve' not in conf.CONF else None
    p = mp.ConvergencePolicy.from_conf(conf.CONF.bhyve, 2 * GiB, 0)
    assert p.levels[0] == conf.CONF.bhyve.live_migration_downtime
    assert p.levels[-1] == conf.CONF.bhyve.live_migration_downtime_max
