"""What the host has for the sandbox: this host has it all; a fake /proc or
cgroup root lacking something is reported by name."""
import os

from nova_bhyve.sandbox import features


def _touch(path, text=''):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(text)


def _fake_host(root, seccomp=True, v1=('cpu', 'memory', 'pids'),
               v2=None):
    proc = os.path.join(root, 'proc')
    _touch(os.path.join(proc, 'self', 'status'),
           'Name:\tx\n' + ('Seccomp:\t0\n' if seccomp else ''))
    cg = os.path.join(root, 'cgroup')
    os.makedirs(cg)
    for c in v1:
        _touch(os.path.join(cg, c, 'cgroup.procs'))
    if v2 is not None:
        _touch(os.path.join(cg, 'unified', 'cgroup.controllers'),
               ' '.join(v2) + '\n')
    return proc, cg


def test_this_host_has_landlock():
    assert features.landlock_abi() >= 1


def test_this_host_lacks_nothing():
    assert features.missing() == []


def test_fake_host_with_everything(tmp_path):
    proc, cg = _fake_host(str(tmp_path))
    assert features.missing(proc, cg, abi=1) == []


def test_missing_controller_is_named(tmp_path):
    proc, cg = _fake_host(str(tmp_path), v1=('cpu', 'memory'),
                          v2=('hugetlb',))
    lacking = features.missing(proc, cg, abi=7)
    assert len(lacking) == 1
    assert lacking[0].startswith('cgroup controller pids ')


def test_v2_with_every_controller_is_enough(tmp_path):
    proc, cg = _fake_host(str(tmp_path), v1=(),
                          v2=('cpu', 'memory', 'pids'))
    assert features.missing(proc, cg, abi=7) == []


def test_controllers_split_across_layouts(tmp_path):
    proc, cg = _fake_host(str(tmp_path), v1=('cpu', 'memory'),
                          v2=('pids',))
    lacking = features.missing(proc, cg, abi=7)
    assert len(lacking) == 1 and 'in one layout' in lacking[0]


def test_no_landlock_no_seccomp(tmp_path):
    proc, cg = _fake_host(str(tmp_path), seccomp=False)
    lacking = features.missing(proc, cg, abi=0)
    assert [w.split()[0] for w in lacking] == ['landlock', 'seccomp']
