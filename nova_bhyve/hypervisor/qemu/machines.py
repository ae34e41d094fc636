"""QEMU machine types: the versioned machine a new VM gets, and which
machines this host's QEMU knows.

A guest is started with a versioned machine (``pc-q35-7.2``), never with
the alias (``q35``): an alias points to the newest machine of the QEMU
that reads it, and a destination with a newer QEMU would build other
hardware than the source's (a migration stream it cannot load, a guest
that sees its devices change). The versioned name is kept in the VM spec
(``VMSpec.machine``) and travels with it.

``qemu-system-x86_64 -machine help`` is read once per binary and cached.
Only q35 machines are accepted: the command line this driver renders
needs PCIe root ports (hot-plug) and ich9-ahci (SATA, cdrom).
"""
import re
import threading

from oslo_concurrency import processutils

#: the alias a new VM resolves when the image asks for nothing
DEFAULT_ALIAS = 'q35'
#: names of the machine family the rendered command line needs
_Q35 = re.compile(r'^(q35|pc-q35-\d+(\.\d+)+)$')
# "q35      Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)"
_ALIAS = re.compile(r'\(alias of (\S+)\)')

_lock = threading.Lock()
_cache = {}


class MachineTypes:
    """What one QEMU binary knows: its machine names and its aliases."""

    def __init__(self, names, aliases):
        self.names = frozenset(names)
        self.aliases = dict(aliases)

    def resolve(self, requested):
        """The versioned q35 machine for ``requested`` (an alias, a
        versioned name or None for the default); ValueError saying why
        not."""
        name = requested or DEFAULT_ALIAS
        if name not in self.names:
            raise ValueError('machine type %s is unknown to this host\'s '
                             'QEMU' % name)
        name = self.aliases.get(name, name)
        if not _Q35.match(name):
            raise ValueError('machine type %s is not a q35 machine: '
                             'nova-bhyve guests need one (PCIe root ports, '
                             'ich9-ahci)' % (requested or name))
        return name

    def knows(self, name):
        return name in self.names

    def versioned_q35(self):
        """The versioned q35 machines, sorted by name."""
        return sorted(n for n in self.names
                      if _Q35.match(n) and n not in self.aliases)


def parse(text):
    """MachineTypes from the output of ``-machine help``."""
    names, aliases = set(), {}
    for line in text.splitlines():
        if not line.strip() or line.startswith('Supported machines'):
            continue
        name = line.split()[0]
        names.add(name)
        alias = _ALIAS.search(line)
        if alias:
            aliases[name] = alias.group(1)
    return MachineTypes(names, aliases)


def probe(binary):
    """MachineTypes of ``binary``, read once per process."""
    with _lock:
        if binary not in _cache:
            out, _ = processutils.execute(binary, '-machine', 'help')
            _cache[binary] = parse(out)
        return _cache[binary]
