"""Can a running guest move from the source host to this one? The rules,
on two hosts' ``cpu_info`` (pure; the facts are the backends' cpu_info,
what get_available_resource reports and Nova keeps in the compute node
record).

A live migration is refused when:

* the architectures differ;
* the accelerators differ (KVM vs TCG, or bhyve's vmm): the vCPU state
  one writes the other does not load;
* the destination's hypervisor is older than the source's: it may not
  read a newer stream, or lack the machine type (the instance's own
  machine is checked by the caller, hypervisor.check_machine);
* the guest CPU differs (``[bhyve] qemu_cpu_model`` set differently): the
  destination would start a different CPU;
* with hardware acceleration only: the vendors differ, or the
  destination's CPU lacks features of the source's. The guest CPU is the
  host's (``-cpu host``, bhyve), so every host feature may be in use - a
  conservative rule (a named ``qemu_cpu_model`` uses fewer). With TCG the
  guest CPU is emulated: the hosts' CPUs do not matter.

Facts a source does not report (an older nova-bhyve) are not checked.
"""
from oslo_serialization import jsonutils


def load(text):
    """A cpu_info JSON string as a dict; ValueError when it is not one."""
    info = jsonutils.loads(text) if isinstance(text, str) else text
    if not isinstance(info, dict):
        raise ValueError('cpu_info is not a JSON object: %r' % (text,))
    return info


def version_text(version):
    """Nova's integer version (7002022) as 7.2.22."""
    return '%d.%d.%d' % (version // 1000000, version // 1000 % 1000,
                         version % 1000)


def refusals(source, dest):
    """Why a guest running on ``source`` cannot move live to ``dest`` (two
    cpu_info dicts): a list of sentences, empty when it can."""
    reasons = []

    def both(key):
        return (source.get(key) is not None and
                dest.get(key) is not None)
    if both('arch') and source['arch'] != dest['arch']:
        reasons.append('the source is %s, this host %s'
                       % (source['arch'], dest['arch']))
    if both('accelerator') and source['accelerator'] != dest['accelerator']:
        reasons.append('the source runs its guests under %s, this host '
                       'under %s: the vCPU state does not move between '
                       'accelerators' % (source['accelerator'].upper(),
                                         dest['accelerator'].upper()))
    if both('hypervisor_version') and both('hypervisor_type') and \
            source['hypervisor_type'] == dest['hypervisor_type'] and \
            dest['hypervisor_version'] < source['hypervisor_version']:
        reasons.append('%s %s here is older than the source\'s %s: it may '
                       'not read its migration stream or know its machine '
                       'types' % (dest['hypervisor_type'],
                                  version_text(dest['hypervisor_version']),
                                  version_text(source['hypervisor_version'])))
    if both('guest_cpu') and source['guest_cpu'] != dest['guest_cpu']:
        reasons.append('the guest CPU model differs (source: %s, here: %s; '
                       '[bhyve] qemu_cpu_model)' % (source['guest_cpu'],
                                                   dest['guest_cpu']))
    if source.get('accelerator') not in (None, 'tcg'):
        if both('vendor') and source['vendor'] != dest['vendor']:
            reasons.append('the source\'s CPU is %s, this host\'s %s'
                           % (source['vendor'], dest['vendor']))
        missing = sorted(set(source.get('features') or ()) -
                         set(dest.get('features') or ()))
        if missing:
            reasons.append('this host\'s CPU lacks features of the '
                           'source\'s, which the guest CPU (%s) may use: %s'
                           % (source.get('guest_cpu') or 'host',
                              ' '.join(missing)))
    return reasons


def machine_refusal(machine, dest):
    """Why ``dest`` (a cpu_info dict) cannot run the versioned
    ``machine``; None when it can or does not say."""
    known = dest.get('machine_types')
    if not machine or not known or machine in known:
        return None
    return ('machine type %s is unknown to the destination\'s %s %s'
            % (machine, dest.get('hypervisor_type', 'hypervisor'),
               version_text(dest['hypervisor_version'])
               if dest.get('hypervisor_version') else ''))
