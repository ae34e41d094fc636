"""What /proc says of a process, for the sandbox tests (interop and
functional)."""


def status(pid):
    """/proc/PID/status as {field: [words]}."""
    out = {}
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            key, _, value = line.partition(':')
            out[key] = value.split()
    return out
