"""The test guest (tools/build-test-guest) boots under bare QEMU.

Builds the guest into the cache (or reuses it), then boots it with plain
qemu-system-x86_64 under TCG - no driver involved - and checks the serial
console protocol the other functional tests, the demo and the benchmarks rely
on:

* direct kernel boot (-kernel/-initrd) with root.qcow2 behind a qcow2 overlay;
* firmware boot (SeaBIOS -> syslinux) of disk.qcow2, no -kernel;
* ACPI power button (QMP system_powerdown) makes QEMU exit by itself;
* the serial shell answers; two boots of one disk are told apart (boot id,
  count);
* nbmem (the memory dirtier the migration benchmarks run in the guest) ticks at
  its rate and dirties memory at the rate asked, as QEMU itself measures it.

The cached images are never written: every boot uses a fresh qcow2 overlay in a
private temp dir, removed afterwards. QEMU is stopped by its PID only.

Environment: NOVA_BHYVE_CACHE (default /var/cache/nova-bhyve) - the guest lives
in $NOVA_BHYVE_CACHE/test-guest; NOVA_BHYVE_BOOT_TIMEOUT (default 180 s per
marker).
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import pytest

REPO = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
BUILD_TOOL = os.path.join(REPO, "tools", "build-test-guest")
QEMU = shutil.which("qemu-system-x86_64")
QEMU_IMG = shutil.which("qemu-img")
BOOT_TIMEOUT = float(os.environ.get("NOVA_BHYVE_BOOT_TIMEOUT", "180"))


def guest_dir():
    cache = os.environ.get("NOVA_BHYVE_CACHE", "/var/cache/nova-bhyve")
    return os.path.join(cache, "test-guest")


@pytest.fixture(scope="session")
def manifest():
    out = guest_dir()
    proc = subprocess.run(
        [BUILD_TOOL, out],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout.decode(errors="replace")[-4000:]
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="nbtg-")  # short: QMP socket path limit is 108
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Guest:
    """A bare QEMU process; serial console on stdio, QMP on a unix socket."""

    def __init__(self, workdir, args):
        self.qmp_path = os.path.join(workdir, "qmp.sock")
        self.log_path = os.path.join(
            workdir, "serial-%d.log" % time.monotonic_ns()
        )
        self.argv = [
            QEMU,
            "-accel",
            "tcg",
            "-M",
            "q35",
            "-m",
            "256",
            "-nographic",
            "-no-reboot",
            "-qmp",
            "unix:%s,server=on,wait=off" % self.qmp_path,
        ] + args
        self._buf = b""
        self._cond = threading.Condition()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        with open(self.log_path, "wb") as log:
            while True:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                log.write(chunk)
                with self._cond:
                    self._buf += chunk
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self):
        with self._cond:
            return self._buf.decode(errors="replace")

    def wait_for(self, pattern, timeout=BOOT_TIMEOUT, start=0):
        """Wait until regex `pattern` matches the console output; return
        the match."""
        rx = re.compile(
            pattern.encode() if isinstance(pattern, str) else pattern
        )
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(self._buf, start)
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or (
                    self.proc.poll() is not None
                    and not self._reader.is_alive()
                ):
                    raise AssertionError(
                        "no %r on the console after %.0f s (qemu rc=%s); "
                        "tail:\n%s" % (
                            pattern,
                            time.monotonic() - self.started,
                            self.proc.poll(),
                            self._buf[-3000:].decode(errors="replace"),
                        )
                    )
                self._cond.wait(min(left, 1.0))

    def type(self, text):
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def qmp(self, command, timeout=30, **arguments):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(self.qmp_path)
        f = s.makefile("rwb")
        request = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        try:
            json.loads(f.readline())  # greeting
            for cmd in ({"execute": "qmp_capabilities"}, request):
                f.write(json.dumps(cmd).encode() + b"\n")
                f.flush()
                while True:
                    reply = json.loads(f.readline())
                    if "return" in reply or "error" in reply:
                        break  # skip events
                assert "return" in reply, reply
            return reply["return"]
        finally:
            f.close()
            s.close()

    def wait_exit(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self):
        """Stop this QEMU by its PID (never by name)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._reader.join(10)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


@pytest.fixture
def boot(workdir):
    guests = []

    def _boot(args):
        g = Guest(workdir, args)
        guests.append(g)
        return g

    yield _boot
    for g in guests:
        g.stop()


def overlay(workdir, base, name):
    path = os.path.join(workdir, name)
    subprocess.run(
        [
            QEMU_IMG,
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base,
            "-F",
            "qcow2",
            path,
        ],
        check=True,
    )
    return path


def file_digest(path):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def assert_booted(guest, manifest):
    markers = manifest["markers"]
    m = guest.wait_for(
        re.escape(markers["init"]) + r" boot_id=([0-9a-f-]{36})"
    )
    init_at = time.monotonic() - guest.started
    guest.wait_for(re.escape(markers["root_mounted"]) + r" dev=/dev/vd\w+")
    count = guest.wait_for(re.escape(markers["boot_count"]) + r" (\d+)")
    guest.wait_for(re.escape(markers["acpid_started"]))
    guest.wait_for(re.escape(markers["shell_ready"]))
    assert markers["module_failed"] not in guest.output, guest.output[-3000:]
    return m.group(1).decode(), int(count.group(1)), init_at


def assert_powers_off(guest, manifest):
    guest.qmp("system_powerdown")
    rc = guest.wait_exit(60)
    assert rc is not None, (
        "QEMU did not exit after system_powerdown:\n" + guest.output[-2000:]
    )
    assert rc == 0, rc
    assert manifest["markers"]["powerdown"] in guest.output


pytestmark = pytest.mark.skipif(
    QEMU is None or QEMU_IMG is None,
    reason="qemu-system-x86_64 / qemu-img not installed",
)


def test_manifest(manifest):
    assert manifest["kernel"]["version"].endswith("-amd64")
    assert manifest["kernel"]["package"].startswith("linux-image-6.")
    for name in (
        "vmlinuz",
        "initrd.img",
        "root.qcow2",
        "root.raw",
        "disk.qcow2",
        "disk.raw",
    ):
        entry = manifest["files"][name]
        assert os.path.getsize(entry["path"]) == entry["size"] > 0
    for mod in (
        "virtio_ring",
        "virtio_pci",
        "virtio_blk",
        "virtio_net",
        "net_failover",
        "jbd2",
        "ext4",
        "evdev",
        "button",
    ):
        assert mod in manifest["modules"], mod
    # modules.dep order: dependencies before their users
    order = manifest["modules"]
    assert (
        order.index("virtio_ring")
        < order.index("virtio")
        < order.index("virtio_pci")
    )
    assert order.index("jbd2") < order.index("ext4")
    assert order.index("net_failover") < order.index("virtio_net")


def test_direct_kernel_boot_and_powerdown(manifest, workdir, boot):
    base = manifest["root_qcow2"]
    before = file_digest(base)
    disk = overlay(workdir, base, "root-overlay.qcow2")
    g = boot(
        [
            "-kernel",
            manifest["vmlinuz"],
            "-initrd",
            manifest["initrd"],
            "-append",
            manifest["cmdline"],
            "-drive",
            "file=%s,if=virtio,format=qcow2" % disk,
        ]
    )
    boot_id, count, init_at = assert_booted(g, manifest)
    assert count == 1
    print(
        "init marker %.1f s after qemu start, boot_id %s" % (init_at, boot_id)
    )

    # the serial console is a shell
    mark = len(g._buf)
    g.type("echo nb-shell-$((6*7)); cat /proc/cmdline\n")
    g.wait_for(r"nb-shell-42", timeout=60, start=mark)

    assert_powers_off(g, manifest)
    assert file_digest(base) == before, "the cached root image was written"


def test_firmware_boot_whole_disk(manifest, workdir, boot):
    base = manifest["disk_qcow2"]
    before = file_digest(base)
    disk = overlay(workdir, base, "disk-overlay.qcow2")
    # no -kernel/-initrd: SeaBIOS -> MBR -> syslinux -> kernel + initramfs
    g = boot(["-drive", "file=%s,if=virtio,format=qcow2" % disk])
    g.wait_for(r"SYSLINUX")
    boot_id, count, _ = assert_booted(g, manifest)
    assert count == 1
    assert re.search(r"ROOT-MOUNTED \S+ dev=/dev/vda2", g.output), g.output[
        -2000:
    ]
    assert_powers_off(g, manifest)
    assert file_digest(base) == before, "the cached disk image was written"


def test_two_boots_are_told_apart_and_tick(manifest, workdir, boot):
    disk = overlay(workdir, manifest["root_qcow2"], "root-overlay.qcow2")
    args = [
        "-kernel",
        manifest["vmlinuz"],
        "-initrd",
        manifest["initrd"],
        "-append",
        manifest["cmdline"] + " nbtick=1",
        "-drive",
        "file=%s,if=virtio,format=qcow2" % disk,
    ]
    seen = []
    for expected_count in (1, 2):
        g = boot(args)
        boot_id, count, _ = assert_booted(g, manifest)
        assert count == expected_count
        seen.append(boot_id)
        g.wait_for(r"tick 2\b", timeout=60)
        assert_powers_off(g, manifest)
    assert seen[0] != seen[1]


def test_no_root_disk_reports_failure(manifest, workdir, boot):
    g = boot(
        [
            "-kernel",
            manifest["vmlinuz"],
            "-initrd",
            manifest["initrd"],
            "-append",
            manifest["cmdline"],
        ]
    )
    g.wait_for(re.escape(manifest["markers"]["init"]))
    g.wait_for(re.escape(manifest["markers"]["root_failed"]))
    g.wait_for(re.escape(manifest["markers"]["shell_ready"]))
    assert manifest["markers"]["root_mounted"] not in g.output
    assert_powers_off(g, manifest)


NBMEM_TICK = re.compile(rb"NBMEM (\d+) (\d+)\r?\n")


def dirty_rate(guest, seconds=2):
    """QEMU's own measure of the guest's dirty rate in MiB/s: QMP
    calc-dirty-rate in page-sampling mode (hashes of 4096 random pages per GiB
    of guest RAM, the most QEMU 7.2 allows, before and after ``seconds``). Its
    dirty-bitmap mode
    would count every page, but crashes QEMU 7.2 under TCG (SIGSEGV)."""
    guest.qmp(
        "calc-dirty-rate", **{"calc-time": seconds, "sample-pages": 4096}
    )
    deadline = time.monotonic() + seconds + 60
    while True:
        info = guest.qmp("query-dirty-rate")
        if info["status"] == "measured":
            return info["dirty-rate"]
        assert time.monotonic() < deadline, info
        time.sleep(0.5)


def test_nbmem_ticks_and_dirties_memory_at_its_rate(manifest, workdir, boot):
    disk = overlay(workdir, manifest["root_qcow2"], "root-overlay.qcow2")
    g = boot(
        [
            "-kernel",
            manifest["vmlinuz"],
            "-initrd",
            manifest["initrd"],
            "-append",
            manifest["cmdline"],
            "-drive",
            "file=%s,if=virtio,format=qcow2" % disk,
        ]
    )
    assert_booted(g, manifest)
    idle = dirty_rate(g)

    rate, size = 24, 96  # MiB/s over 96 MiB: 2 s of it touch 48 MiB
    mark = len(g._buf)
    g.type("nbmem %d %d &\n" % (rate, size))
    g.wait_for(
        r"NBMEM-START rate_mib_s=%d size_mib=%d tick_ms=10 pid=\d+"
        % (rate, size),
        timeout=60,
        start=mark,
    )
    g.wait_for(r"NBMEM 50 \d+", timeout=60, start=mark)
    busy = dirty_rate(g)
    print(
        "dirty rate idle %s MiB/s, nbmem at %d MiB/s: %s MiB/s"
        % (idle, rate, busy)
    )
    assert idle < rate / 2, idle
    assert rate / 2 <= busy <= rate * 2, busy

    # ticks: consecutive, every 10 ms of the guest's clock
    mark = len(g._buf)
    time.sleep(3)
    g.type("kill %1\n")
    # up to the line's end: the console may deliver it in pieces
    m = g.wait_for(
        r"NBMEM-STOP seq=(\d+) dirtied_mib=(\d+) elapsed_ms=(\d+)\r?\n",
        timeout=60,
        start=mark,
    )
    ticks = [
        (int(a), int(b))
        for a, b in NBMEM_TICK.findall(g._buf[mark : m.start()])
    ]
    seqs = [t[0] for t in ticks]
    assert len(ticks) >= 150, len(ticks)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    gaps = sorted(b[1] - a[1] for a, b in zip(ticks, ticks[1:]))
    median_ms = gaps[len(gaps) // 2] / 1e6
    assert 9 <= median_ms <= 12, median_ms
    # what it says it did matches what was asked
    lines, dirtied, elapsed = (int(x) for x in m.groups())
    assert lines > seqs[-1]
    assert rate / 2 <= dirtied / (elapsed / 1000) <= rate * 1.1, (
        dirtied,
        elapsed,
    )
    # and it stopped
    time.sleep(1)
    after = g._buf[m.end() :]
    assert not NBMEM_TICK.search(after), after[-500:]
