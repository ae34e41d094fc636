#!/bin/bash
#
# plugin.sh - devstack plugin: nova-compute with the nova-bhyve driver
#
# Acts only when VIRT_DRIVER=bhyve (see override-defaults and settings) and
# nova-compute (n-cpu) is enabled on this node. Phases:
#
#   stack install      host packages (QEMU on Linux), pip install of this
#                      repository (not editable: the nova.virt.bhyve shim
#                      must land inside the installed nova tree)
#   stack post-config  [DEFAULT]compute_driver = bhyve.BhyveDriver and the
#                      [bhyve] options in $NOVA_CONF (nova-compute's
#                      $NOVA_CPU_CONF is copied from it when n-cpu starts)
#   unstack            nothing: devstack stops nova-compute; VMs run in
#                      their own processes and survive it, as libvirt
#                      guests survive libvirtd
#   clean              stops the VMs of $NOVA_INSTANCES_PATH, uninstalls
#
# On FreeBSD (which devstack itself does not support; this is what a
# FreeBSD compute host needs, checked and reported here) the bhyve backend
# needs the vmm(4) kernel module (kldload vmm; vmm_load="YES" in
# /boot/loader.conf), nmdm(4) for serial consoles, if_bridge(4) and
# if_tuntap(4) for networking, and UEFI firmware for bhyve (pkg install
# bhyve-firmware, which provides
# /usr/local/share/uefi-firmware/BHYVE_UEFI.fd).

# Save trace setting
_XTRACE_NOVA_BHYVE=$(set +o | grep xtrace)
set +o xtrace

NOVA_BHYVE_DIR=${NOVA_BHYVE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
NOVA_CONF_DIR=${NOVA_CONF_DIR:-/etc/nova}
NOVA_CONF=${NOVA_CONF:-$NOVA_CONF_DIR/nova.conf}
NOVA_BHYVE_OS=${NOVA_BHYVE_OS:-$(uname -s)}
NOVA_BHYVE_COMPUTE_DRIVER=bhyve.BhyveDriver

# The python nova-compute runs with (devstack's global venv when enabled).
function _nova_bhyve_python {
    if [[ -n "${NOVA_BHYVE_PYTHON:-}" ]]; then
        echo "$NOVA_BHYVE_PYTHON"
    elif [[ "${GLOBAL_VENV:-}" == "True" && -x "${DEVSTACK_VENV:-}/bin/python3" ]]; then
        echo "$DEVSTACK_VENV/bin/python3"
    else
        echo "${PYTHON:-python3}"
    fi
}

# install_nova_bhyve_packages - what the driver runs VMs with
function install_nova_bhyve_packages {
    if [[ "$NOVA_BHYVE_OS" == "FreeBSD" ]]; then
        _nova_bhyve_check_freebsd
        return
    fi
    # gcc and the Python headers: pip compiles libvdsk (native/) with cffi
    if is_ubuntu; then
        install_package qemu-system-x86 qemu-utils genisoimage gcc python3-dev
    elif is_fedora; then
        install_package qemu-kvm qemu-img genisoimage gcc python3-devel
    else
        install_package qemu-system-x86 qemu-utils genisoimage gcc python3-dev
    fi
}

# _nova_bhyve_check_freebsd - report what a FreeBSD bhyve host lacks
function _nova_bhyve_check_freebsd {
    local mod
    for mod in vmm nmdm if_bridge if_tuntap; do
        if ! kldstat -q -m "$mod" 2>/dev/null && ! kldstat -q -n "$mod" 2>/dev/null; then
            echo "nova-bhyve: kernel module $mod is not loaded:" \
                 "kldload $mod (and ${mod}_load=\"YES\" in /boot/loader.conf)"
        fi
    done
    local fw=${BHYVE_BOOTROM:-/usr/local/share/uefi-firmware/BHYVE_UEFI.fd}
    if [[ ! -f "$fw" ]]; then
        echo "nova-bhyve: no bhyve UEFI firmware at $fw: pkg install bhyve-firmware"
    fi
}

# install_nova_bhyve - pip install of this repository, then make sure the
# nova.virt.bhyve shim is inside the nova tree nova-compute imports
function install_nova_bhyve {
    install_nova_bhyve_packages
    # Not setup_develop: an editable install does not put nova/virt/bhyve
    # into Nova's tree, and Nova imports drivers from nova.virt.
    pip_install "$NOVA_BHYVE_DIR"
    _nova_bhyve_link_shim
}

# _nova_bhyve_link_shim - devstack installs Nova itself editable from
# $NOVA_DIR, so nova.virt is $NOVA_DIR/nova/virt and the shim the wheel put
# into site-packages is not on its path: put a copy next to Nova's drivers.
function _nova_bhyve_link_shim {
    local python virt_dir
    python=$(_nova_bhyve_python)
    virt_dir=$($python -c 'import os, nova.virt; print(os.path.dirname(nova.virt.__file__))') ||
        die $LINENO "nova-bhyve: cannot import nova.virt with $python"
    if ! $python -c 'import nova.virt.bhyve' 2>/dev/null; then
        echo_summary "Installing the nova.virt.bhyve shim into $virt_dir"
        sudo install -d "$virt_dir/bhyve"
        sudo install -m 644 "$NOVA_BHYVE_DIR/nova/virt/bhyve/__init__.py" \
            "$virt_dir/bhyve/__init__.py"
    fi
    $python -c 'import nova.virt.bhyve' ||
        die $LINENO "nova-bhyve: nova.virt.bhyve is not importable with $python"
}

# configure_nova_bhyve - nova.conf for the driver
function configure_nova_bhyve {
    iniset "$NOVA_CONF" DEFAULT compute_driver "$NOVA_BHYVE_COMPUTE_DRIVER"
    iniset "$NOVA_CONF" bhyve hypervisor "${BHYVE_HYPERVISOR:-auto}"
    iniset "$NOVA_CONF" bhyve qemu_accel "${BHYVE_QEMU_ACCEL:-auto}"
    iniset "$NOVA_CONF" bhyve cold_migrate_to_same_host \
        "${BHYVE_COLD_MIGRATE_TO_SAME_HOST:-False}"
    if [[ -n "${BHYVE_QEMU_BINARY:-}" ]]; then
        iniset "$NOVA_CONF" bhyve qemu_binary "$BHYVE_QEMU_BINARY"
    fi
    if [[ -n "${BHYVE_BOOTROM:-}" ]]; then
        iniset "$NOVA_CONF" bhyve bhyve_bootrom "$BHYVE_BOOTROM"
    fi
}

# cleanup_nova_bhyve - stop the VMs (each instance directory has the pid of
# its VM process) and uninstall
function cleanup_nova_bhyve {
    local instances=${NOVA_INSTANCES_PATH:-${NOVA_STATE_PATH:-/opt/stack/data/nova}/instances}
    local pidfile pid dir
    for pidfile in "$instances"/*/vm.pid; do
        [[ -f "$pidfile" ]] || continue
        dir=$(dirname "$pidfile")
        pid=$(cat "$pidfile")
        # only a process started for this instance directory
        if [[ "$pid" =~ ^[0-9]+$ ]] && ps -o args= -p "$pid" 2>/dev/null | grep -qF "$dir"; then
            sudo kill -TERM "$pid" || true
        fi
    done
    local python virt_dir
    python=$(_nova_bhyve_python)
    virt_dir=$($python -c 'import os, nova.virt; print(os.path.dirname(nova.virt.__file__))' 2>/dev/null) || virt_dir=""
    pip_uninstall nova-bhyve
    if [[ -n "$virt_dir" && -f "$virt_dir/bhyve/__init__.py" ]]; then
        sudo rm -rf "$virt_dir/bhyve"
    fi
}

if [[ "${VIRT_DRIVER:-}" == "bhyve" ]] && is_service_enabled n-cpu; then
    if [[ "${1:-}" == "stack" && "${2:-}" == "install" ]]; then
        echo_summary "Installing nova-bhyve"
        install_nova_bhyve

    elif [[ "${1:-}" == "stack" && "${2:-}" == "post-config" ]]; then
        echo_summary "Configuring nova-compute for nova-bhyve"
        configure_nova_bhyve
    fi

    if [[ "${1:-}" == "unstack" ]]; then
        # devstack stops nova-compute; the VMs keep running, as they do
        # across a nova-compute restart (adopted by init_host)
        :
    fi

    if [[ "${1:-}" == "clean" ]]; then
        echo_summary "Cleaning up nova-bhyve"
        cleanup_nova_bhyve
    fi
fi

# Restore xtrace
$_XTRACE_NOVA_BHYVE
