"""The sandboxed QEMU's command lines (pure) and the host check at start.
Real sandboxed QEMUs: tests/interop/test_qemu_sandbox.py."""
import logging

import pytest

from nova_bhyve import conf
from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.qemu import backend as qemu
from nova_bhyve.hypervisor.qemu import sandboxed
from nova_bhyve.sandbox import launcher

CONF = conf.CONF


def test_sandbox_argv_drops_what_the_launcher_does_and_adds_seccomp():
    plain = ['/usr/bin/qemu-system-x86_64', '-name', 'guest=x',
             '-pidfile', '/i/u/vm.pid', '-daemonize', '-m', '128M']
    assert sandboxed.sandbox_argv(plain) == [
        '/usr/bin/qemu-system-x86_64', '-name', 'guest=x', '-m', '128M',
        '-sandbox', 'on,obsolete=deny,elevateprivileges=deny,spawn=deny,'
                    'resourcecontrol=deny']


def test_sandbox_argv_names_the_binary_by_its_absolute_path():
    argv = sandboxed.sandbox_argv(['qemu-system-x86_64', '-m', '1'],
                                  which=lambda name: '/usr/bin/' + name)
    assert argv[:3] == ['/usr/bin/qemu-system-x86_64', '-m', '1']
    with pytest.raises(base.HypervisorError, match='qemu-x not found'):
        sandboxed.sandbox_argv(['qemu-x'], which=lambda name: None)


def test_a_binary_outside_usr_is_executable_too():
    spec = sandboxed.Sandbox.launch_spec(['/opt/q/qemu', '-m', '1'], [3],
                                         64001, [])
    assert spec.rx == ['/usr', '/opt/q/qemu']


def test_reopened_fds_are_the_proc_self_fd_paths_of_the_argv():
    argv = ['q', '-kernel', '/proc/self/fd/8', '-initrd', '/proc/self/fd/9',
            '-blockdev', 'driver=raw,file.filename=/dev/fdset/1',
            '-chardev', 'socket,id=x,fd=3', '-append', 'x=/proc/self/fd/a']
    assert sandboxed.reopened_fds(argv) == [8, 9]


def test_launch_spec_keeps_every_descriptor_and_lets_qemu_read_two():
    spec = sandboxed.Sandbox.launch_spec(
        ['/usr/bin/qemu-system-x86_64', '-kernel', '/proc/self/fd/8',
         '-initrd', '/proc/self/fd/9'], [3, 4, 8, 9],
        64001, ['/sys/fs/cgroup/nova-bhyve/x'])
    spec.pid_fd = 11            # spawn fills these in
    spec.status_fd = 10
    assert launcher.argv(spec, '/l') == [
        '/l', '--uid', '64001', '--gid', '64001',
        '--cgroup', '/sys/fs/cgroup/nova-bhyve/x',
        '--keep-fd', '3', '--keep-fd', '4',
        '--ro-fd', '8', '--ro-fd', '9',
        '--rx', '/usr', '--rw', '/dev/null',
        '--unshare', 'ipc,uts,mount', '--status-fd', '10',
        '--daemonize', '--pid-fd', '11',
        '--', '/usr/bin/qemu-system-x86_64', '-kernel', '/proc/self/fd/8',
        '-initrd', '/proc/self/fd/9']


def test_vnc_is_the_one_port_a_sandboxed_qemu_may_bind():
    assert sandboxed.vnc_ports(['q', '-m', '1']) == []
    assert sandboxed.vnc_ports(['q', '-vnc', '127.0.0.1:7,to=9']) == [
        5907, 5908, 5909]
    assert sandboxed.vnc_ports(['q', '-vnc', '[::1]:0']) == [5900]


def test_a_host_lacking_a_feature_is_refused_by_name(monkeypatch):
    # fault injection: this host has every feature, so pretend it lacks two
    monkeypatch.setattr(sandboxed.features, 'missing',
                        lambda: ['landlock (no ABI)', 'seccomp (none)'])
    with pytest.raises(base.HypervisorError,
                       match=r'lacks what the VM sandbox needs: landlock '
                             r'\(no ABI\); seccomp \(none\).*\[bhyve\] '
                             r'sandbox = false'):
        qemu.QemuHypervisor().check_host()


def test_sandbox_off_is_a_warning_at_every_start(monkeypatch, caplog):
    monkeypatch.setattr(sandboxed.features, 'missing',
                        lambda: ['landlock (no ABI)'])
    CONF.set_override('sandbox', False, group='bhyve')
    try:
        with caplog.at_level(logging.WARNING):
            hyp = qemu.QemuHypervisor()
            hyp.check_host()
            hyp.check_host()
        assert hyp.sandbox is None
    finally:
        CONF.clear_override('sandbox', group='bhyve')
    warned = [r for r in caplog.records if 'sandbox is off' in r.message]
    assert len(warned) == 2


def test_this_host_passes_the_check():
    qemu.QemuHypervisor().check_host()


def test_the_devices_a_sandboxed_qemu_opens():
    assert sandboxed.devices(['q', '-machine', 'q35,accel=tcg']) == [
        '/dev/null']
    assert sandboxed.devices(['q', '-machine', 'q35,accel=kvm']) == [
        '/dev/null', '/dev/kvm']


def test_a_device_the_vm_uid_cannot_open_is_refused_before_launch(
        tmp_path):
    node = tmp_path / 'kvm'
    node.write_text('')
    node.chmod(0o600)
    with pytest.raises(base.HypervisorError, match='mode 600.*0666'):
        sandboxed.check_devices([str(node)])
    node.chmod(0o666)
    sandboxed.check_devices([str(node)])
    with pytest.raises(base.HypervisorError, match='No such file'):
        sandboxed.check_devices([str(tmp_path / 'none')])


def test_post_copy_needs_unprivileged_userfaultfd(tmp_path):
    sysctl = tmp_path / 'unprivileged_userfaultfd'
    sysctl.write_text('0\n')
    with pytest.raises(base.HypervisorError,
                       match='vm.unprivileged_userfaultfd = 1'):
        sandboxed.check_post_copy(str(sysctl))
    sysctl.write_text('1\n')
    sandboxed.check_post_copy(str(sysctl))
    with pytest.raises(base.HypervisorError):
        sandboxed.check_post_copy(str(tmp_path / 'none'))


def test_a_post_copy_fallback_the_sandbox_cannot_do_is_refused_at_start(
        monkeypatch):
    # fault injection: the sysctl as a host without it says
    monkeypatch.setattr(sandboxed, 'userfaultfd_allowed', lambda path: False)
    CONF.set_override('live_migration_fallback', 'post-copy', group='bhyve')
    try:
        with pytest.raises(base.HypervisorError,
                           match='post-copy needs vm.unprivileged'):
            qemu.QemuHypervisor().check_host()
    finally:
        CONF.clear_override('live_migration_fallback', group='bhyve')
