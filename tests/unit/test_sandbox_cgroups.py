"""The per-VM cgroup: flavor extra specs to limits (pure), the v2 and v1
writers on a fake hierarchy, and on this host's real hierarchy a process
started by the launcher in its cgroup with the limits set, a fork bomb
stopped by pids.max. Every cgroup made is removed, every process killed by
pid."""
import json
import os
import subprocess
import textwrap

import pytest

from nova_bhyve.sandbox import cgroups
from nova_bhyve.sandbox import launcher
from nova_bhyve.sandbox import spawn

from sandbox_helpers import kill_pid
from sandbox_helpers import launcher_binary
from sandbox_helpers import needs_root_and_landlock
from sandbox_helpers import PYTHON
from sandbox_helpers import SYSTEM_RX
from sandbox_helpers import Uids

MiB = 1024 * 1024


# -- flavor -> limits -------------------------------------------------------

def test_limits_from_flavor_as_libvirt_maps_them():
    lim = cgroups.limits_for(1024, 4, {'quota:cpu_shares': '2048',
                                       'quota:cpu_period': '50000',
                                       'quota:cpu_quota': '25000'},
                             overhead_mb=256, pids_max=512)
    assert lim == cgroups.Limits(memory_bytes=1280 * MiB, pids_max=512,
                                 cpu_shares=2048, cpu_period=50000,
                                 cpu_quota=100000)   # per vCPU x 4


def test_limits_defaults_and_unlimited_quota():
    assert cgroups.limits_for(512, 1, {}, 0, 64) == cgroups.Limits(
        memory_bytes=512 * MiB, pids_max=64)
    lim = cgroups.limits_for(512, 2, {'quota:cpu_quota': '-1'}, 0, 64)
    assert lim.cpu_quota is None
    # a quota without a period gets the kernel's default period
    lim = cgroups.limits_for(512, 2, {'quota:cpu_quota': '10000'}, 0, 64)
    assert (lim.cpu_quota, lim.cpu_period) == (20000, 100000)


@pytest.mark.parametrize('specs', [{'quota:cpu_shares': '0'},
                                   {'quota:cpu_period': '10'},
                                   {'quota:cpu_quota': '5'},
                                   {'quota:cpu_shares': 'many'}])
def test_limits_refuse_bad_specs(specs):
    with pytest.raises(ValueError):
        cgroups.limits_for(512, 1, specs, 0, 64)


# -- the writers, on a fake hierarchy ---------------------------------------

def _touch(path, text=''):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(text)


def _read(path):
    with open(path) as f:
        return f.read().strip()


def test_v2_chosen_when_unified_has_the_controllers(tmp_path):
    root = str(tmp_path)
    _touch(os.path.join(root, 'cgroup.controllers'), 'cpuset cpu io memory '
           'pids\n')
    _touch(os.path.join(root, 'cgroup.subtree_control'))
    cg = cgroups.detect(root, parent='nb')
    assert cg.version == 2
    lim = cgroups.Limits(memory_bytes=768 * MiB, pids_max=100,
                         cpu_shares=300, cpu_period=100000, cpu_quota=200000)
    dirs = cg.create('vm1', lim)
    assert dirs == [os.path.join(root, 'nb', 'vm1')]
    assert _read(os.path.join(root, 'cgroup.subtree_control')) == \
        '+cpu +memory +pids'
    assert _read(os.path.join(root, 'nb', 'cgroup.subtree_control')) == \
        '+cpu +memory +pids'
    vm = dirs[0]
    assert _read(os.path.join(vm, 'memory.max')) == str(768 * MiB)
    assert _read(os.path.join(vm, 'pids.max')) == '100'
    assert _read(os.path.join(vm, 'cpu.weight')) == '300'
    assert _read(os.path.join(vm, 'cpu.max')) == '200000 100000'
    with pytest.raises(cgroups.CgroupError, match='1-10000'):
        cg.create('vm2', cgroups.Limits(MiB, 10, cpu_shares=20000))


def test_v1_chosen_in_a_hybrid_layout_lacking_v2_controllers(tmp_path):
    root = str(tmp_path)
    _touch(os.path.join(root, 'unified', 'cgroup.controllers'), 'hugetlb\n')
    for c in cgroups.CONTROLLERS:
        _touch(os.path.join(root, c, 'cgroup.procs'))
    cg = cgroups.detect(root, parent='nb')
    assert cg.version == 1
    dirs = cg.create('vm1', cgroups.Limits(
        memory_bytes=MiB, pids_max=10, cpu_shares=512, cpu_period=20000,
        cpu_quota=-1))
    assert dirs == [os.path.join(root, c, 'nb', 'vm1')
                    for c in ('cpu', 'memory', 'pids')]
    assert _read(os.path.join(dirs[1], 'memory.limit_in_bytes')) == str(MiB)
    assert _read(os.path.join(dirs[2], 'pids.max')) == '10'
    assert _read(os.path.join(dirs[0], 'cpu.shares')) == '512'
    assert _read(os.path.join(dirs[0], 'cpu.cfs_period_us')) == '20000'
    assert _read(os.path.join(dirs[0], 'cpu.cfs_quota_us')) == '-1'


def test_detect_names_what_is_missing(tmp_path):
    root = str(tmp_path)
    _touch(os.path.join(root, 'unified', 'cgroup.controllers'), 'cpu\n')
    _touch(os.path.join(root, 'cpu', 'cgroup.procs'))
    _touch(os.path.join(root, 'memory', 'cgroup.procs'))
    with pytest.raises(cgroups.CgroupError) as e:
        cgroups.detect(root)
    assert 'v1 lacks pids' in str(e.value)
    assert 'v2 lacks memory, pids' in str(e.value)


def test_names_cannot_escape_the_parent(tmp_path):
    cg = cgroups.CgroupsV1(str(tmp_path), parent='nb')
    for bad in ('../x', 'a/b', '', '..', '.'):
        with pytest.raises(ValueError):
            cg.dirs(bad)


# -- this host's real hierarchy ---------------------------------------------

def real(test):
    """Root, Landlock, and a host hierarchy with the controllers."""
    for mark in needs_root_and_landlock() + [pytest.mark.skipif(
            bool(cgroups.missing_v1() and cgroups.missing_v2()),
            reason='no cgroup hierarchy with cpu, memory and pids')]:
        test = mark(test)
    return test


@pytest.fixture
def host_cgroups():
    """The host's layout, under a parent of this test's own."""
    cg = cgroups.detect(parent='nova-bhyve-test-%d' % os.getpid())
    made = []
    yield cg, made
    for name in made:
        for pid in cg.procs(name):
            kill_pid(pid)
        cg.remove(name)
        assert not cg.exists(name)
    parents = ({os.path.dirname(d) for name in made for d in cg.dirs(name)})
    for parent in parents:
        os.rmdir(parent)


@pytest.fixture
def ids():
    u = Uids()
    yield u
    u.release_all()


def _limit_files(cg, name):
    d = dict(zip(('cpu', 'memory', 'pids'), cg.dirs(name))) \
        if cg.version == 1 else dict.fromkeys(('cpu', 'memory', 'pids'),
                                              cg.dirs(name)[0])
    mem = 'memory.limit_in_bytes' if cg.version == 1 else 'memory.max'
    return os.path.join(d['memory'], mem), os.path.join(d['pids'],
                                                        'pids.max')


@real
def test_process_in_its_cgroup_with_its_limits(host_cgroups, ids):
    cg, made = host_cgroups
    name = 'vm-%d' % os.getpid()
    made.append(name)
    lim = cgroups.limits_for(64, 1, {'quota:cpu_shares': '512'}, 32, 40)
    dirs = cg.create(name, lim)
    uid = ids.get()
    got = spawn.start(launcher.Spec(uid=uid, gid=uid, cgroups=dirs,
                                    rx=SYSTEM_RX,
                                    program=['/bin/sleep', '60']),
                      launcher_path=launcher_binary())
    try:
        assert cg.procs(name) == [got.pid]
        for d in dirs:
            with open(os.path.join(d, 'cgroup.procs')) as f:
                assert str(got.pid) in f.read().split()
        mem, pids = _limit_files(cg, name)
        assert _read(mem) == str(96 * MiB)
        assert _read(pids) == '40'
        with pytest.raises(cgroups.CgroupError, match='still holds'):
            cg.remove(name)
    finally:
        kill_pid(got.pid)
        got.proc.wait()


FORK_BOMB = textwrap.dedent('''
    import errno, json, os
    r, w = os.pipe()
    children, err = [], None
    for _ in range(200):            # bounded, whatever happens
        try:
            pid = os.fork()
        except OSError as e:
            err = e.errno
            break
        if pid == 0:
            os.close(w)
            os.read(r, 1)           # until the parent lets go
            os._exit(0)
        children.append(pid)
    os.close(w)                     # every child sees EOF and exits
    for pid in children:
        os.waitpid(pid, 0)
    print(json.dumps({'forked': len(children), 'errno': err}))
''')


@real
def test_fork_bomb_stopped_by_pids_max(host_cgroups, ids):
    cg, made = host_cgroups
    name = 'bomb-%d' % os.getpid()
    made.append(name)
    dirs = cg.create(name, cgroups.limits_for(256, 1, {}, 0, 16))
    uid = ids.get()
    got = spawn.start(launcher.Spec(uid=uid, gid=uid, cgroups=dirs,
                                    rx=SYSTEM_RX,
                                    program=[PYTHON, '-I', '-S', '-B', '-c',
                                             FORK_BOMB]),
                      launcher_path=launcher_binary(),
                      stdout=subprocess.PIPE)
    out, _ = got.proc.communicate(timeout=120)
    result = json.loads(out)
    assert result['errno'] == 11            # EAGAIN from fork
    assert result['forked'] < 16


@real
def test_rename_moves_the_cgroup_with_its_process(host_cgroups, ids):
    cg, made = host_cgroups
    old, new = 'in-%d' % os.getpid(), 'vm-%d' % os.getpid()
    made.append(new)
    dirs = cg.create(old, cgroups.limits_for(64, 1, {}, 32, 40))
    uid = ids.get()
    got = spawn.start(launcher.Spec(uid=uid, gid=uid, cgroups=dirs,
                                    rx=SYSTEM_RX,
                                    program=['/bin/sleep', '60']),
                      launcher_path=launcher_binary())
    try:
        cg.rename(old, new)
        assert not cg.exists(old)
        assert cg.procs(new) == [got.pid]
        mem, pids = _limit_files(cg, new)
        assert _read(pids) == '40'
        cg.rename(old, new)             # nothing left to move: no error
    finally:
        kill_pid(got.pid)
        got.proc.wait()
