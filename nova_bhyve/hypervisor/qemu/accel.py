"""Choose QEMU's accelerator by measurement.

/dev/kvm can be present yet useless: under a paravirtual nested hypervisor
(e.g. kvm_pvm) real-mode firmware code, which every PC guest runs first,
executes orders of magnitude slower than under TCG, and a stock kernel never
finishes booting. So ``auto`` runs the same tiny workload under both
accelerators - SeaBIOS's POST, then a boot sector that issues BIOS disk calls
the way a kernel's real-mode setup does and exits through isa-debug-exit - and
picks KVM only if it finishes, and faster than TCG.
"""
import os
import subprocess
import tempfile
import threading
import time

from oslo_log import log as logging

LOG = logging.getLogger(__name__)

# 16-bit boot sector: 2000 x (INT 13h AH=08h "get drive parameters"), then
# OUT 0xf4 <- 1 (isa-debug-exit: QEMU exits with status 3), HLT forever.
_BOOT_CODE = bytes([
    0xB9, 0xD0, 0x07,        # mov cx, 2000
    0x51,                    # l: push cx
    0xB4, 0x08,              # mov ah, 8
    0xB2, 0x80,              # mov dl, 0x80
    0xCD, 0x13,              # int 0x13
    0x59,                    # pop cx
    0xE2, 0xF6,              # loop l
    0xBA, 0xF4, 0x00,        # mov dx, 0xf4
    0xB0, 0x01,              # mov al, 1
    0xEE,                    # out dx, al
    0xF4,                    # hlt
    0xEB, 0xFD,              # jmp hlt
])
_EXIT_OK = 3                 # (1 << 1) | 1

_lock = threading.Lock()
_chosen = {}


def _boot_sector():
    return _BOOT_CODE + bytes(510 - len(_BOOT_CODE)) + b'\x55\xaa'


def run_workload(qemu, accel, timeout):
    """Seconds the calibration guest takes under ``accel``, None if it
    fails or exceeds ``timeout``."""
    with tempfile.TemporaryDirectory(prefix='nova-bhyve-accel-') as tmp:
        image = os.path.join(tmp, 'boot.img')
        with open(image, 'wb') as f:
            f.write(_boot_sector())
        argv = [qemu, '-accel', accel, '-M', 'pc', '-m', '16',
                '-nodefaults', '-no-user-config', '-display', 'none',
                '-no-reboot',
                '-device', 'isa-debug-exit,iobase=0xf4,iosize=4',
                '-drive', 'file=%s,format=raw,if=ide' % image]
        # Popen + polling rather than run(timeout=): under eventlet the
        # TimeoutExpired raised is not the class this module would catch.
        start = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        except OSError as e:
            LOG.warning('accelerator calibration could not run %s: %s',
                        qemu, e)
            return None
        while proc.poll() is None:
            if time.monotonic() - start > timeout:
                proc.kill()
                proc.wait()
                return None
            time.sleep(0.01)
        if proc.returncode != _EXIT_OK:
            return None
        return time.monotonic() - start


def choose(qemu, requested, timeout):
    """'kvm' or 'tcg' for ``requested`` in (auto, kvm, tcg); decided once
    per process and logged once."""
    if requested != 'auto':
        return requested
    with _lock:
        if qemu not in _chosen:
            _chosen[qemu] = _calibrate(qemu, timeout)
        return _chosen[qemu]


def kvm_device_usable():
    """Whether this process may open /dev/kvm read/write (the only KVM
    prerequisite checked before calibrating)."""
    return os.access('/dev/kvm', os.R_OK | os.W_OK)


def decide(kvm, tcg):
    """The decision alone, from the two calibration times (seconds, None
    for a failed or timed-out run): KVM only if it finished and was no
    slower than TCG."""
    return 'kvm' if kvm is not None and (tcg is None or kvm <= tcg) \
        else 'tcg'


def kvm_timeout(timeout, tcg):
    """How long the KVM run may take: KVM is only chosen if it is at least
    as fast as TCG, so it need not run (much) longer than TCG did."""
    return timeout if tcg is None else min(timeout, tcg + 0.5)


def _calibrate(qemu, timeout):
    if not kvm_device_usable():
        LOG.info('QEMU accelerator: tcg (no usable /dev/kvm)')
        return 'tcg'
    tcg = run_workload(qemu, 'tcg', timeout)
    kvm = run_workload(qemu, 'kvm', kvm_timeout(timeout, tcg))
    choice = decide(kvm, tcg)
    LOG.info('QEMU accelerator: %s (calibration run: kvm %s, tcg %s)',
             choice, _fmt(kvm), _fmt(tcg))
    return choice


def _fmt(seconds):
    return 'failed/timed out' if seconds is None else '%.2fs' % seconds
