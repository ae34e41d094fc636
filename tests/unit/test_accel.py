"""hypervisor/accel.py: choosing QEMU's accelerator by measurement.

The calibration runs a real process per accelerator. Here that process is a
small fake "qemu" (a shell script written to a temp dir) that logs its argv,
sleeps for a scripted time and exits 3 the way QEMU does through
isa-debug-exit - or fails, or hangs past the timeout. Only os.access is
patched, and only to simulate a host without /dev/kvm access. One test runs
the real calibration workload under real QEMU TCG.
"""
import os
import pathlib
import shutil
import tempfile
import time
from unittest import mock

import pytest

from nova_bhyve.hypervisor.qemu import accel

KVM_USABLE = os.access('/dev/kvm', os.R_OK | os.W_OK)
needs_kvm_access = pytest.mark.skipif(
    not KVM_USABLE, reason='needs read/write access to /dev/kvm (the fakes '
                           'replace QEMU, not the /dev/kvm check)')


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


@needs_kvm_access
def test_kvm_faster_chooses_kvm(fake_qemu):
    binary = fake_qemu(tcg=ok(0.8), kvm=ok(0.05))
    assert accel.choose(binary, 'auto', 10) == 'kvm'
    assert sorted(calls(binary)) == ['kvm', 'tcg']


@needs_kvm_access
def test_kvm_slower_chooses_tcg(fake_qemu):
    binary = fake_qemu(tcg=ok(0.05), kvm=ok(0.8))
    assert accel.choose(binary, 'auto', 10) == 'tcg'
    assert sorted(calls(binary)) == ['kvm', 'tcg']


@needs_kvm_access
def test_kvm_fails_chooses_tcg(fake_qemu):
    binary = fake_qemu(tcg=ok(0.3), kvm=FAIL)
    assert accel.choose(binary, 'auto', 10) == 'tcg'


@needs_kvm_access
def test_kvm_wrong_exit_status_chooses_tcg(fake_qemu):
    # exit 0 is not the isa-debug-exit status: the workload did not finish
    binary = fake_qemu(tcg=ok(0.3), kvm='exit 0')
    assert accel.choose(binary, 'auto', 10) == 'tcg'


@needs_kvm_access
def test_kvm_times_out_chooses_tcg(fake_qemu):
    binary = fake_qemu(tcg=ok(0.05), kvm=HANG)
    start = time.monotonic()
    assert accel.choose(binary, 'auto', 1.0) == 'tcg'
    assert time.monotonic() - start < 10


@needs_kvm_access
def test_tcg_fails_kvm_works_chooses_kvm(fake_qemu):
    binary = fake_qemu(tcg=FAIL, kvm=ok(0.3))
    assert accel.choose(binary, 'auto', 10) == 'kvm'


@needs_kvm_access
def test_both_fail_chooses_tcg(fake_qemu):
    binary = fake_qemu(tcg=FAIL, kvm=FAIL)
    assert accel.choose(binary, 'auto', 10) == 'tcg'


def test_missing_binary_chooses_tcg(tmp_dir):
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


@needs_kvm_access
def test_decision_cached_per_binary(fake_qemu):
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


def test_real_qemu_tcg_runs_calibration_workload():
    """The calibration guest really reaches isa-debug-exit under TCG."""
    binary = shutil.which('qemu-system-x86_64')
    if binary is None:
        pytest.skip('no qemu-system-x86_64')
    seconds = accel.run_workload(binary, 'tcg', 60)
    assert seconds is not None
    assert 0 < seconds < 60


@needs_kvm_access
def test_slow_kvm_run_is_cut_off_soon_after_tcg_finished(fake_qemu):
    # kvm would take 30 s; it cannot win once it is slower than TCG, so the
    # calibration stops it about 0.5 s after TCG's time, not at the timeout
    qemu = fake_qemu(tcg=ok(0.2), kvm='exec sleep 30')
    start = time.monotonic()
    assert accel.choose(qemu, 'auto', timeout=20) == 'tcg'
    assert time.monotonic() - start < 5
