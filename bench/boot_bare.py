#!/usr/bin/env python3
"""Boot time of the test guest under bare QEMU/TCG (the baseline for the
driver).

Measures, over N runs, the wall time from starting qemu-system-x86_64 to each
serial console marker of the test guest (tools/build-test-guest), and the time
from QMP system_powerdown to QEMU's exit. Prints one JSON object; "median" per
marker.

    bench/boot_bare.py [--runs 5] [--mode kernel|disk] [--guest-dir DIR]

mode kernel: -kernel/-initrd + root.qcow2 overlay (the driver's default);
mode disk:   SeaBIOS -> syslinux from disk.qcow2 overlay (firmware boot).
Each run uses a fresh qcow2 overlay in a temp dir (removed); QEMU is stopped
by PID.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_TOOL = os.path.join(REPO, "tools", "build-test-guest")


def default_guest_dir():
    return os.path.join(
        os.environ.get("NOVA_BHYVE_CACHE", "/var/cache/nova-bhyve"),
        "test-guest",
    )


def qmp(path, command, timeout=30):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    f = s.makefile("rwb")
    try:
        f.readline()
        for cmd in ({"execute": "qmp_capabilities"}, {"execute": command}):
            f.write(json.dumps(cmd).encode() + b"\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "return" in reply or "error" in reply:
                    break
    finally:
        f.close()
        s.close()


def drain(fd):
    try:
        while os.read(fd, 65536):
            pass
    except OSError:
        pass


def one_run(manifest, mode, timeout, extra=()):
    markers = manifest["markers"]
    wanted = [
        ("init", markers["init"]),
        ("root_mounted", markers["root_mounted"]),
        ("shell_ready", markers["shell_ready"]),
    ]
    tmp = tempfile.mkdtemp(prefix="nbbb-")
    proc = None
    try:
        base = (
            manifest["root_qcow2"]
            if mode == "kernel"
            else manifest["disk_qcow2"]
        )
        disk = os.path.join(tmp, "overlay.qcow2")
        subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                base,
                "-F",
                "qcow2",
                disk,
            ],
            check=True,
        )
        sock = os.path.join(tmp, "qmp.sock")
        argv = [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-M",
            "q35",
            "-m",
            "256",
            "-nographic",
            "-no-reboot",
            "-qmp",
            "unix:%s,server=on,wait=off" % sock,
            "-drive",
            "file=%s,if=virtio,format=qcow2" % disk,
        ]
        if mode == "kernel":
            argv += [
                "-kernel",
                manifest["vmlinuz"],
                "-initrd",
                manifest["initrd"],
                "-append",
                manifest["cmdline"],
            ]
        argv += list(extra)
        times = {}
        buf = bytearray()
        t0 = time.monotonic()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = t0 + timeout
        pending = list(wanted)
        fd = proc.stdout.fileno()
        while pending:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    "timeout waiting for %s; tail: %r"
                    % (pending[0][1], bytes(buf[-1500:]))
                )
            chunk = os.read(fd, 65536)
            now = time.monotonic()
            if not chunk:
                raise RuntimeError(
                    "qemu exited rc=%s; tail: %r"
                    % (proc.wait(), bytes(buf[-1500:]))
                )
            buf += chunk
            while pending and pending[0][1].encode() in buf:
                times[pending.pop(0)[0]] = round(now - t0, 3)
        # drain the console in the background so QEMU never blocks on it
        threading.Thread(target=drain, args=(fd,), daemon=True).start()
        t1 = time.monotonic()
        qmp(sock, "system_powerdown")
        proc.wait(60)
        times["powerdown_to_exit"] = round(time.monotonic() - t1, 3)
        times["exit_code"] = proc.returncode
        return times
    finally:
        if proc is not None:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
            proc.stdout.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mode", choices=("kernel", "disk"), default="kernel")
    ap.add_argument("--guest-dir", default=default_guest_dir())
    ap.add_argument("--timeout", type=float, default=180)
    ap.add_argument(
        "--qemu-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra QEMU argument (repeat), e.g. --qemu-arg=-nic "
        "--qemu-arg=none to match the driver's device set",
    )
    args = ap.parse_args()

    subprocess.run([BUILD_TOOL, args.guest_dir], check=True, stdout=sys.stderr)
    with open(os.path.join(args.guest_dir, "manifest.json")) as f:
        manifest = json.load(f)

    runs = []
    for i in range(args.runs):
        r = one_run(manifest, args.mode, args.timeout, args.qemu_arg)
        print("run %d: %s" % (i + 1, r), file=sys.stderr)
        runs.append(r)
    keys = ("init", "root_mounted", "shell_ready", "powerdown_to_exit")
    result = {
        "benchmark": "boot_bare",
        "mode": args.mode,
        "accel": "tcg",
        "machine": "q35",
        "memory_mb": 256,
        "extra_qemu_args": args.qemu_arg,
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "runs": args.runs,
        "kernel": manifest["kernel"]["version"],
        "host": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "qemu": subprocess.run(
                ["qemu-system-x86_64", "--version"],
                capture_output=True,
                text=True,
            ).stdout.splitlines()[0],
        },
        "unit": "seconds from qemu start "
        "(powerdown_to_exit: from system_powerdown)",
        "median": {
            k: round(statistics.median(r[k] for r in runs), 3) for k in keys
        },
        "min": {k: min(r[k] for r in runs) for k in keys},
        "max": {k: max(r[k] for r in runs) for k in keys},
        "samples": runs,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
