"""hypervisor/accel.py: choosing QEMU's accelerator by measurement.

The calibration runs a real process per accelerator. Here that process is a
small fake "qemu" (a shell script written to a temp dir) that logs its argv,
sleeps for a scripted time and exits 3 the way QEMU does through
isa-debug-exit - or fails, or hangs past the timeout - or a wrapper that runs
the real QEMU under TCG for both "accelerators".

Nothing here needs /dev/kvm, writable or present: where the fake or the
wrapper plays KVM, KVM's availability (accel.kvm_device_usable, the
/dev/kvm access check) is mocked to True with the ``kvm_available``
fixture, and the one test of that check itself patches os.access. Everything
else - run_workload, the KVM run's cut-off, decide(), the per-binary cache -
is the real code.
"""
import os
import pathlib
import shutil
import tempfile
import time
from unittest import mock

import pytest

from nova_bhyve.hypervisor.qemu import accel

QEMU = shutil.which('qemu-system-x86_64')
needs_qemu = pytest.mark.skipif(QEMU is None,
                                reason='no qemu-system-x86_64 '
                                       '(tools/setup-host installs it)')


@pytest.fixture
def kvm_available(monkeypatch):
    """Mock: KVM is available (/dev/kvm usable) - the fake qemu, not the
    kernel, then decides how the 'kvm' calibration run goes."""
    monkeypatch.setattr(accel, 'kvm_device_usable', lambda: True)


@pytest.fixture(autouse=True)
def _reset_cache():
    accel._chosen.clear()
    yield
    accel._chosen.clear()


# A fake qemu: `$2` is the accelerator (argv is "-accel ACCEL ...").
_SCRIPT = '''#!/bin/sh
echo "$*" >> '{log}'
case "$2" in
  tcg) {tcg} ;;
  kvm) {kvm} ;;
  *) exit 99 ;;
esac
'''


def ok(seconds):
    return 'sleep %s; exit 3' % seconds


FAIL = 'echo "Could not access KVM kernel module" >&2; exit 1'
HANG = 'exec sleep 60'        # exec: the timeout kill hits the sleep itself


@pytest.fixture
def tmp_dir():
    path = tempfile.mkdtemp(prefix='nb-accel-test-')
    yield pathlib.Path(path)
    shutil.rmtree(path)


@pytest.fixture
def fake_qemu(tmp_dir):
    def make(tcg, kvm, name='qemu-system-x86_64'):
        path = tmp_dir / name
        log = tmp_dir / (name + '.log')
        path.write_text(_SCRIPT.format(log=log, tcg=tcg, kvm=kvm))
        path.chmod(0o755)
        return str(path)
    return make


def calls(binary):
    try:
        with open(binary + '.log') as f:
            return [line.split()[1] for line in f]
    except FileNotFoundError:
        return []


@pytest.mark.parametrize('requested', ['tcg', 'kvm'])
def test_explicit_choice_passes_through_without_running_qemu(
        fake_qemu, requested):
    binary = fake_qemu(tcg=ok(0), kvm=ok(0))
    assert accel.choose(binary, requested, 5) == requested
    assert calls(binary) == []
    assert accel._chosen == {}


def test_kvm_faster_chooses_kvm(fake_qemu, kvm_available):
    """KVM availability mocked; the fake qemu's 'kvm' run is faster."""
    binary = fake_qemu(tcg=ok(0.8), kvm=ok(0.05))
    assert accel.choose(binary, 'auto', 10) == 'kvm'
    assert sorted(calls(binary)) == ['kvm', 'tcg']


def test_kvm_slower_chooses_tcg(fake_qemu, kvm_available):
    """KVM availability mocked; the fake qemu's 'kvm' run is slower."""
    binary = fake_qemu(tcg=ok(0.05), kvm=ok(0.3))
    assert accel.choose(binary, 'auto', 10) == 'tcg'
    assert sorted(calls(binary)) == ['kvm', 'tcg']


def test_kvm_fails_chooses_tcg(fake_qemu, kvm_available):
    """KVM availability mocked; the fake qemu's 'kvm' run fails the way
    QEMU does when it cannot use KVM."""
    binary = fake_qemu(tcg=ok(0.3), kvm=FAIL)
    assert accel.choose(binary, 'auto', 10) == 'tcg'
    assert sorted(calls(binary)) == ['kvm', 'tcg']


def test_kvm_wrong_exit_status_chooses_tcg(fake_qemu, kvm_available):
    """KVM availability mocked; exit 0 is not the isa-debug-exit status:
    the workload did not finish."""
    binary = fake_qemu(tcg=ok(0.3), kvm='exit 0')
    assert accel.choose(binary, 'auto', 10) == 'tcg'


def test_kvm_times_out_chooses_tcg(fake_qemu, kvm_available):
    """KVM availability mocked; the 'kvm' run hangs and is killed (TCG
    failed too, so the cut-off is the full timeout)."""
    binary = fake_qemu(tcg=FAIL, kvm=HANG)
    start = time.monotonic()
    assert accel.choose(binary, 'auto', 1.0) == 'tcg'
    assert 1.0 <= time.monotonic() - start < 10


def test_tcg_fails_kvm_works_chooses_kvm(fake_qemu, kvm_available):
    """KVM availability mocked; only the 'kvm' run finishes."""
    binary = fake_qemu(tcg=FAIL, kvm=ok(0.3))
    assert accel.choose(binary, 'auto', 10) == 'kvm'


def test_both_fail_chooses_tcg(fake_qemu, kvm_available):
    """KVM availability mocked; neither run finishes."""
    binary = fake_qemu(tcg=FAIL, kvm=FAIL)
    assert accel.choose(binary, 'auto', 10) == 'tcg'


def test_missing_binary_chooses_tcg(tmp_dir, kvm_available):
    """KVM availability mocked, so that both runs are attempted (and
    cannot start)."""
    assert accel.choose(str(tmp_dir / 'no-such-qemu'), 'auto', 5) == 'tcg'


def test_no_dev_kvm_access_chooses_tcg_without_running_qemu(fake_qemu):
    binary = fake_qemu(tcg=ok(0.5), kvm=ok(0))
    real_access = os.access

    def access(path, mode, *a, **kw):
        # fault injection: a host whose /dev/kvm this user cannot open
        if path == '/dev/kvm':
            return False
        return real_access(path, mode, *a, **kw)

    with mock.patch.object(accel.os, 'access', side_effect=access) as m:
        assert accel.choose(binary, 'auto', 10) == 'tcg'
    m.assert_any_call('/dev/kvm', os.R_OK | os.W_OK)
    assert calls(binary) == []


def test_decision_cached_per_binary(fake_qemu, kvm_available):
    """KVM availability mocked; the fakes play both accelerators."""
    a = fake_qemu(tcg=ok(0.6), kvm=ok(0.05), name='qemu-a')
    b = fake_qemu(tcg=ok(0.05), kvm=ok(0.6), name='qemu-b')
    assert accel.choose(a, 'auto', 10) == 'kvm'
    assert accel.choose(a, 'auto', 10) == 'kvm'
    assert len(calls(a)) == 2            # one calibration: tcg + kvm once
    assert accel.choose(b, 'auto', 10) == 'tcg'
    assert len(calls(b)) == 2
    # The cached answer stands even after the binary changes behaviour.
    shutil.copy(b, a)
    assert accel.choose(a, 'auto', 10) == 'kvm'
    assert len(calls(a)) == 2 and len(calls(b)) == 2


def test_workload_argv(fake_qemu):
    binary = fake_qemu(tcg=ok(0), kvm=ok(0))
    assert accel.run_workload(binary, 'tcg', 5) is not None
    with open(binary + '.log') as f:
        args = f.read().split()
    assert args[:2] == ['-accel', 'tcg']
    assert 'isa-debug-exit,iobase=0xf4,iosize=4' in args
    assert '-no-reboot' in args


def test_run_workload_measures_scripted_time(fake_qemu):
    binary = fake_qemu(tcg=ok(0.4), kvm=FAIL)
    seconds = accel.run_workload(binary, 'tcg', 5)
    assert 0.4 <= seconds < 3
    assert accel.run_workload(binary, 'kvm', 5) is None


def test_boot_sector_shape():
    sector = accel._boot_sector()
    assert len(sector) == 512
    assert sector[-2:] == b'\x55\xaa'
    # OUT 0xf4 <- 1: the byte pair ends the loop before HLT
    assert b'\xba\xf4\x00\xb0\x01\xee\xf4' in sector


@needs_qemu
def test_real_qemu_tcg_runs_calibration_workload():
    """The calibration guest really reaches isa-debug-exit under TCG."""
    seconds = accel.run_workload(QEMU, 'tcg', 60)
    assert seconds is not None
    assert 0 < seconds < 60


def test_slow_kvm_run_is_cut_off_soon_after_tcg_finished(fake_qemu,
                                                          kvm_available):
    """KVM availability mocked; 'kvm' would take 30 s: it cannot win once
    it is slower than TCG, so the calibration stops it about 0.5 s after
    TCG's time, not at the timeout."""
    qemu = fake_qemu(tcg=ok(0.2), kvm='exec sleep 30')
    start = time.monotonic()
    assert accel.choose(qemu, 'auto', timeout=20) == 'tcg'
    assert time.monotonic() - start < 5


@pytest.mark.parametrize('kvm,tcg,choice', [
    (0.1, 0.5, 'kvm'),
    (0.5, 0.5, 'kvm'),          # a tie goes to KVM
    (0.6, 0.5, 'tcg'),
    (None, 0.5, 'tcg'),
    (0.5, None, 'kvm'),
    (None, None, 'tcg'),
])
def test_decide(kvm, tcg, choice):
    assert accel.decide(kvm, tcg) == choice


def test_kvm_run_timeout():
    assert accel.kvm_timeout(10, None) == 10
    assert accel.kvm_timeout(10, 2.0) == 2.5
    assert accel.kvm_timeout(1, 2.0) == 1


# -- the real QEMU under TCG on both sides ------------------------------------

# A wrapper "qemu": the calibration's argv is "-accel ACCEL ..."; both
# accelerators run the real QEMU with -accel tcg, each side after its own
# shell command and with its own extra options.
_WRAPPER = '''#!/bin/sh
accel=$2
shift 2
echo "-accel $accel" >> '{log}'
case "$accel" in
  tcg) {tcg}; exec '{qemu}' -accel tcg {tcg_args} "$@" ;;
  kvm) {kvm}; exec '{qemu}' -accel tcg {kvm_args} "$@" ;;
esac
exit 99
'''


@pytest.fixture
def tcg_both_sides(tmp_dir):
    def make(tcg=':', kvm=':', tcg_args='', kvm_args=''):
        path = tmp_dir / 'qemu-system-x86_64'
        path.write_text(_WRAPPER.format(
            log=str(path) + '.log', qemu=QEMU, tcg=tcg, kvm=kvm,
            tcg_args=tcg_args, kvm_args=kvm_args))
        path.chmod(0o755)
        return str(path)
    return make


@needs_qemu
def test_real_qemu_faster_kvm_side_is_chosen(tcg_both_sides, kvm_available):
    """KVM availability mocked; 'kvm' is the real QEMU under TCG and the
    'tcg' run is the same started 2 s late: the real workload must exit
    through isa-debug-exit on both sides for 'kvm' to be chosen."""
    binary = tcg_both_sides(tcg='sleep 2')
    assert accel.choose(binary, 'auto', 60) == 'kvm'
    assert calls(binary) == ['tcg', 'kvm']


@needs_qemu
def test_real_qemu_hanging_kvm_side_is_cut_off(tcg_both_sides,
                                               kvm_available):
    """KVM availability mocked; 'kvm' is the real QEMU under TCG with its
    CPU never started (-S), like a KVM guest stuck in real mode: it is
    killed 0.5 s after TCG's time, not at the 60 s timeout, and TCG is
    chosen."""
    binary = tcg_both_sides(kvm_args='-S')
    start = time.monotonic()
    assert accel.choose(binary, 'auto', 60) == 'tcg'
    elapsed = time.monotonic() - start
    assert calls(binary) == ['tcg', 'kvm']
    assert elapsed < 15, elapsed
