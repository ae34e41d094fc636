"""Configuration options of the ``[bhyve]`` group.

Host-wide facts Nova already owns (instances_path, allocation ratios, reserved
resources, shutdown timeouts) are read from Nova's own options, not repeated.
"""
from oslo_config import cfg
from oslo_privsep import priv_context

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
    cfg.BoolOpt('bhyve_wired_memory', default=False,
                help='Start bhyve guests with wired (non-pageable) memory '
                     '(bhyve_config memory.wired=true). bhyve live migration '
                     '(FreeBSD-UPB prototype) needs it on the source; a VM '
                     'started without it is refused. Not exercised on '
                     'FreeBSD.'),
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
               help='Most bytes kept in the console log of an instance: '
                    'it is cut to its tail when it grows past this size, '
                    'when the VM (re)starts and, on the qemu backend (the '
                    'console logger process) and bhyve (its supervisor), '
                    'while the VM runs.'),
    cfg.StrOpt('runtime_path',
               default='/run/nova-bhyve',
               help='Directory of the VMs\' runtime files: each VM gets a '
                    'directory in it (mode 0700) holding its monitor '
                    'sockets (qemu backend). Kept short, independent of '
                    'instances_path: a unix socket path has at most 107 '
                    'bytes, so this path may have at most 47.'),

    cfg.StrOpt('privileged_transport',
               default='auto',
               choices=[('auto', 'privsep on Linux, helper on FreeBSD'),
                        ('privsep', 'an oslo.privsep daemon with only '
                                    'CAP_NET_ADMIN and CAP_DAC_OVERRIDE '
                                    '([nova_bhyve_privileged] section)'),
                        ('helper', 'privileged_helper_command, once per '
                                   'operation (FreeBSD has no Linux '
                                   'capabilities for oslo.privsep)')],
               help='How the driver\'s few root operations (taps, bridges, '
                    'OVS ports) are run. See docs/networking.md.'),
    cfg.StrOpt('privileged_helper_command',
               default='sudo nova-bhyve-privhelper',
               help='Command run for each root operation with the helper '
                    'transport; the function name and its JSON arguments '
                    'are appended. Grant exactly this command in sudoers '
                    'or doas.conf (etc/nova-bhyve/sudoers.d/nova-bhyve).'),

    # -- migration (docs/migration.md) -------------------------------------
    cfg.StrOpt('live_migration_inbound_addr',
               help='Address the destination of a live migration listens '
                    'on for the memory stream and, for block migration, the '
                    'disk (NBD) stream. Default: Nova\'s my_ip.'),
    cfg.IntOpt('live_migration_bandwidth',
               default=0, min=0,
               help='Most bandwidth, in MiB/s, a live migration may use for '
                    'the memory and disk streams together. 0 = no cap (for '
                    'QEMU the driver then lifts QEMU\'s own 128 MiB/s '
                    'default). A bandwidth Nova passes for one migration '
                    'overrides it. bhyve\'s migration has no cap and '
                    'refuses a capped migration.'),
    cfg.IntOpt('live_migration_downtime',
               default=300, min=10,
               help='Downtime, in milliseconds, allowed when a live '
                    'migration starts: the lowest of the downtime levels '
                    'the convergence policy chooses from '
                    '(docs/migration.md). The default is QEMU\'s own: a '
                    'lower start bounds the downtime lower but lengthens '
                    'every migration of a dirtying guest by about '
                    '(300 - this) / (1 - dirty rate / bandwidth) ms, e.g. '
                    '0.5 s for 50 ms at half the bandwidth (measured: '
                    'bench/RESULTS-migration.md).'),
    cfg.IntOpt('live_migration_downtime_max',
               default=500, min=10,
               help='Most downtime, in milliseconds, the convergence policy '
                    'may ever allow (the highest level). The guest is never '
                    'stopped for longer than this plus the time to send the '
                    'device state. When it is below '
                    'live_migration_downtime, migrations start at this '
                    'maximum (logged as a warning).'),
    cfg.IntOpt('live_migration_downtime_steps',
               default=5, min=1,
               help='Number of equal steps from live_migration_downtime to '
                    'live_migration_downtime_max: the downtime levels. '
                    'After each pre-copy pass the policy estimates what the '
                    'next pass will leave and jumps straight to the lowest '
                    'level that covers it (no fixed delays between steps); '
                    'the downtime is never lowered.'),
    cfg.StrOpt('live_migration_fallback',
               default='auto-converge',
               choices=[('auto-converge', 'throttle the guest\'s vCPUs in '
                                          'steps until it converges'),
                        ('post-copy', 'switch to post-copy: the guest runs '
                                      'on the destination and fetches the '
                                      'remaining pages on demand'),
                        ('abort', 'cancel the migration; the guest keeps '
                                  'running on the source')],
               help='What the convergence policy does once even the '
                    'maximum downtime cannot cover what a pre-copy pass '
                    'leaves (it waits one pass at the maximum first). QEMU '
                    'only: bhyve\'s migration has no fallback.'),
    cfg.IntOpt('live_migration_completion_timeout',
               default=800, min=0,
               help='Seconds per GiB of data to move (guest memory, plus '
                    'disks for a block migration) after which a live '
                    'migration still in pre-copy is aborted, whatever the '
                    'fallback; the guest keeps running on the source. 0 = '
                    'no timeout. After a switch to post-copy there is '
                    'nothing left to abort.'),
    cfg.BoolOpt('warm_migration',
                default=False,
                help='Cold migrate and resize as a warm migration: the guest '
                     'is suspended (memory and device state saved) on the '
                     'source and resumed on the destination, so it does not '
                     'reboot. Off: a normal cold migration (guest powered '
                     'off and booted again). A resize that changes vCPUs or '
                     'memory is always cold.'),

    cfg.BoolOpt('cold_migrate_to_same_host',
                default=True,
                help='Cold migration may land on the instance\'s own host '
                     '(the driver reports Nova\'s '
                     'COMPUTE_SAME_HOST_COLD_MIGRATE trait, so the scheduler '
                     'may pick it: useful with one compute). Off: a cold '
                     'migration always moves to another host, as with '
                     'libvirt (and as tempest\'s migration tests expect in '
                     'a multi-node cloud: devstack and tools/cloud turn it '
                     'off).'),

    cfg.BoolOpt('sandbox',
                default=True,
                help='Run each VM process (QEMU on Linux) in its own '
                     'sandbox: started by nova-bhyve-launcher in its own '
                     'cgroup (memory, pids, cpu limits), as its own uid '
                     'and gid from sandbox_uid_range, with no capabilities, '
                     'no_new_privs, and Landlock rules allowing only the '
                     'files and TCP ports it needs (everything else it '
                     'gets as open descriptors). nova-compute refuses to '
                     'start when the host lacks a feature the sandbox '
                     'needs (Landlock, seccomp, the cpu/memory/pids cgroup '
                     'controllers) and names it. Off: VM processes run as '
                     'nova-compute\'s user with its authority - only for '
                     'hosts without those features, knowingly. On FreeBSD '
                     'bhyve sandboxes itself with Capsicum: nova-compute '
                     'refuses a bhyve built without it and a kernel '
                     'without capability mode, and with sandbox_jail runs '
                     'each bhyve in a jail of its own (docs/bhyve.md).'),
    cfg.BoolOpt('sandbox_jail',
                default=True,
                help='FreeBSD, with sandbox on: run each bhyve in a jail(8) '
                     'of its own, as its own uid and gid from '
                     'sandbox_uid_range, on a read-only view of / with its '
                     'instance directory on /mnt and a devfs whose ruleset '
                     '(numbered as the uid) shows only its own vmm, nmdm, '
                     'tap and volume devices. Off: bhyve runs as root on '
                     'the host and Capsicum is its only sandbox (a warning '
                     'at every start). Suspend/resume and live migration '
                     'are available only with it off.'),
    cfg.StrOpt('sandbox_uid_range',
               default='64000-64999',
               help='Uids (and gids of the same numbers) given to '
                    'sandboxed VM processes, "FIRST-LAST", one per VM, '
                    'never shared, kept across nova-compute restarts. '
                    'Must belong to no user or group of the host (a uid '
                    'the host knows is skipped) and hold at least as many '
                    'ids as VMs the host may run. On FreeBSD each uid is '
                    'also its VM\'s devfs ruleset number: the range must '
                    'end at 65535 or below and hold no ruleset of '
                    '/etc/devfs.rules.'),
    cfg.IntOpt('sandbox_memory_overhead_mb',
               default=256, min=0,
               help='Memory a sandboxed VM process may use beyond its '
                    'flavor\'s RAM (QEMU\'s own allocations, device '
                    'buffers): its cgroup\'s memory limit is flavor RAM + '
                    'this.'),
    cfg.IntOpt('sandbox_pids_max',
               default=512, min=16,
               help='Most processes and threads a sandboxed VM process may '
                    'have (its cgroup\'s pids.max): QEMU uses a thread '
                    'per vCPU plus I/O and migration threads.'),
]


def register_opts(conf):
    conf.register_group(GROUP)
    conf.register_opts(OPTS, group=GROUP)


def list_opts():
    """Entry point for oslo-config-generator (oslo.config.opts): [bhyve]
    and the oslo.privsep section of the driver's privileged daemon."""
    return [(GROUP, OPTS), ('nova_bhyve_privileged', priv_context.OPTS)]


CONF = cfg.CONF
register_opts(CONF)
