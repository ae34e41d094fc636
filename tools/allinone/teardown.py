"""Taking the cloud down: its servers through the API first (the driver
cleans up after each), then a check of what the computes left."""
import os
import shutil
import signal
import time

from allinone import bootstrap
from allinone import configs
from allinone import layout
from allinone import services


def delete_servers(timeout=300):
    """Delete every server of every project; the names of those that are
    still there after ``timeout``."""
    if not (services.api_up('keystone') and services.api_up('nova')):
        return []
    conn = bootstrap.admin()
    servers = list(conn.compute.servers(all_projects=True))
    for server in servers:
        conn.compute.delete_server(server, force=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = list(conn.compute.servers(all_projects=True))
        if not left:
            return []
        time.sleep(2)
    return [s.name for s in left]


def _vm_pid(vmdir):
    try:
        with open(os.path.join(vmdir, 'vm.pid')) as f:
            pid = int(f.read().split()[0])
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            cmdline = f.read()
    except (OSError, ValueError, IndexError):
        return None
    # still this VM's process: its command line names the instance
    uuid = os.path.basename(vmdir).split('_')[0]
    return pid if uuid.encode() in cmdline else None


def kill_leftover_vms():
    """SIGKILL VM processes still running in the computes' instance
    directories (a compute that was killed, a delete that failed)."""
    killed = []
    for host in layout.COMPUTES:
        root = configs.instances_path(host)
        if not os.path.isdir(root):
            continue
        for entry in os.listdir(root):
            pid = _vm_pid(os.path.join(root, entry))
            if pid:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


def remove_runtime():
    """The computes' runtime directory (their records, the sandbox uid
    allocations): only once no VM runtime directory is left in it."""
    if not os.path.isdir(layout.RUNTIME):
        return []
    vms = [d for d in os.listdir(layout.RUNTIME)
           if d not in ('computes', 'uids')]
    if not vms:
        shutil.rmtree(layout.RUNTIME, ignore_errors=True)
    return vms


def processes_left():
    """Processes still working in the cloud's directory or running from its
    virtualenv: none may be left once every daemon is stopped."""
    left = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            cwd = os.readlink('/proc/%s/cwd' % pid)
            with open('/proc/%s/cmdline' % pid, 'rb') as f:
                cmd = f.read().replace(b'\0', b' ').decode(errors='replace')
        except OSError:
            continue
        if int(pid) == os.getpid():
            continue
        if cwd == layout.BASE or cwd.startswith(layout.BASE + '/') or \
                layout.VENV + '/bin/' in cmd:
            left.append('%s %s' % (pid, cmd.strip()[:120]))
    return left


def remove_state():
    shutil.rmtree(layout.BASE, ignore_errors=True)
