"""Configuration options of the ``[bhyve]`` group.

Host-wide facts Nova already owns (instances_path, allocation ratios, reserved
resources, shutdown timeouts) are read from Nova's own options, not repeated.
"""
from oslo_config import cfg

GROUP = cfg.OptGroup(
    'bhyve', title='bhyve / QEMU driver options',
    help='Options of the nova-bhyve compute driver '
         '(compute_driver = bhyve.BhyveDriver).')

OPTS = [
    cfg.StrOpt('hypervisor',
               default='auto',
               choices=[('auto', 'bhyve on FreeBSD, qemu elsewhere'),
                        ('bhyve', 'FreeBSD bhyve(8)'),
                        ('qemu', 'qemu-system-x86_64')],
               help='Hypervisor backend that runs the instances.'),
    cfg.StrOpt('qemu_binary',
               default='qemu-system-x86_64',
               help='QEMU system emulator used by the qemu backend.'),
    cfg.StrOpt('qemu_accel',
               default='auto',
               choices=[('auto', 'KVM only if a calibration run shows it '
                                 'executes guest code fast, else TCG'),
                        ('kvm', 'always KVM'),
                        ('tcg', 'always TCG (software emulation)')],
               help='QEMU accelerator. The presence of /dev/kvm alone is '
                    'not trusted: nested or paravirtual KVM can be orders '
                    'of magnitude slower than TCG for a stock kernel.'),
    cfg.StrOpt('qemu_cpu_model',
               help='QEMU -cpu model. Default: "host" under KVM, QEMU\'s '
                    'default model under TCG.'),
    cfg.FloatOpt('accel_calibration_timeout',
                 default=10.0, min=1.0,
                 help='Seconds a KVM calibration run may take before KVM is '
                      'judged unusable and TCG is chosen.'),
    cfg.StrOpt('bhyve_path', default='/usr/sbin/bhyve',
               help='bhyve(8) binary.'),
    cfg.StrOpt('bhyvectl_path', default='/usr/sbin/bhyvectl',
               help='bhyvectl(8) binary.'),
    cfg.StrOpt('bhyve_bootrom',
               default='/usr/local/share/uefi-firmware/BHYVE_UEFI.fd',
               help='UEFI firmware (sysutils/edk2 or bhyve-firmware) used '
                    'to boot whole-disk images on bhyve.'),
    cfg.IntOpt('wait_soft_reboot_seconds',
               default=120, min=0,
               help='Seconds to wait for a guest to restart after an ACPI '
                    'reboot request before a SOFT reboot becomes HARD.'),
    cfg.IntOpt('console_log_max_bytes',
               default=100 * 1024, min=1024,
               help='Most bytes of the serial console log returned by '
                    'get_console_output (the tail of the log).'),
    cfg.IntOpt('console_log_keep_bytes',
               default=1024 * 1024, min=4096,
               help='Size at which the console log of an instance is '
                    'rotated when the VM (re)starts.'),
]


def register_opts(conf):
    conf.register_group(GROUP)
    conf.register_opts(OPTS, group=GROUP)


def list_opts():
    """Entry point for oslo-config-generator (oslo.config.opts)."""
    return [(GROUP, OPTS)]


CONF = cfg.CONF
register_opts(CONF)
