"""Runtime statistics of a running QEMU VM (for instance diagnostics).

vCPU time: QMP ``query-cpus-fast`` gives each vCPU's host thread id; the
thread's utime + stime come from /proc/PID/task/TID/stat (clock ticks).
Memory: maximum from ``query-memory-size-summary``, used = the resident
memory of the VM process (guest memory really backed on the host, plus
QEMU's own), from /proc/PID/status. Disks: ``query-blockstats``.
"""
import os

from nova_bhyve.hypervisor.qemu import qmp

_CLK_TCK = os.sysconf('SC_CLK_TCK')
_NS = 1000000000
_MiB = 1024 * 1024


def thread_cpu_ns(pid, tid, proc='/proc'):
    """utime + stime of thread ``tid`` of ``pid`` in nanoseconds."""
    with open(os.path.join(proc, str(pid), 'task', str(tid), 'stat')) as f:
        fields = f.read().rsplit(')', 1)[1].split()
    # fields[0] is field 3 (state): utime is field 14, stime field 15
    ticks = int(fields[11]) + int(fields[12])
    return ticks * _NS // _CLK_TCK


def process_rss_bytes(pid, proc='/proc'):
    with open(os.path.join(proc, str(pid), 'status')) as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) * 1024
    return None


def process_start_seconds_ago(pid, proc='/proc'):
    """Seconds since ``pid`` started (from its stat starttime)."""
    with open(os.path.join(proc, str(pid), 'stat')) as f:
        start_ticks = int(f.read().rsplit(')', 1)[1].split()[19])
    with open(os.path.join(proc, 'uptime')) as f:
        uptime = float(f.read().split()[0])
    return max(0, int(uptime - start_ticks / _CLK_TCK))


def disk_name(index, bus):
    prefix = 'vd' if bus == 'virtio' else 'sd'
    return prefix + 'abcdefghijklmnopqrstuvwxyz'[index]


def blockstats(control, disks):
    """[{name, read_bytes, ...}] for the spec's ``disks``, by node name."""
    by_node = {}
    for entry in qmp.execute(control, 'query-blockstats'):
        by_node[entry.get('node-name')] = entry.get('stats', {})
    out = []
    for i, disk in enumerate(disks):
        st = by_node.get('disk%d' % i) or by_node.get('disk%d-snap' % i)
        if st is None:
            continue
        out.append({
            'name': disk_name(i, disk.bus),
            'read_bytes': st.get('rd_bytes'),
            'read_requests': st.get('rd_operations'),
            'write_bytes': st.get('wr_bytes'),
            'write_requests': st.get('wr_operations'),
            'errors': sum(st.get(k, 0) for k in (
                'failed_rd_operations', 'failed_wr_operations',
                'failed_flush_operations', 'failed_unmap_operations')),
        })
    return out


def stats(pid, control, spec):
    cpus = []
    for cpu in qmp.execute(control, 'query-cpus-fast'):
        try:
            t = thread_cpu_ns(pid, cpu['thread-id'])
        except (OSError, KeyError, ValueError, IndexError):
            t = None
        cpus.append((cpu.get('cpu-index'), t))
    mem = qmp.execute(control, 'query-memory-size-summary')
    rss = process_rss_bytes(pid)
    return {
        'pid': pid,
        'uptime': process_start_seconds_ago(pid),
        'cpus': sorted(cpus, key=lambda c: c[0]),
        # rounded up: under TCG the guest has 8 KiB less than its flavor
        # (qemu.memory_size)
        'memory_max_mb': -(-mem['base-memory'] // _MiB),
        'memory_used_mb': rss // _MiB if rss is not None else None,
        'disks': blockstats(control, spec.disks),
        'nics': [],
    }
