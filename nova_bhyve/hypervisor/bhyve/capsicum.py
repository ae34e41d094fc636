"""Does this host's bhyve sandbox itself with Capsicum? (docs/bhyve.md,
"Sandbox").

NEVER RUN ON FREEBSD: the ELF reader is tested on real ELF files built on
Linux, the sysctl commands are pinned by tests/unit/test_bhyve_sandbox.py.

bhyve enters capability mode itself: usr.sbin/bhyve/bhyverun.c, once the VM
is set up and before the first vCPU runs, calls ``caph_enter()`` inside
``#ifndef WITHOUT_CAPSICUM``. Two things can make that a no-op, and each
has its own check:

* the binary: built with ``-DWITHOUT_CAPSICUM`` (illumos builds its bhyve
  that way) it has no Capsicum code at all. ``caph_enter()`` is a static
  inline of lib/libcapsicum/capsicum_helpers.h around the cap_enter(2)
  system call stub of libc, so a bhyve that can enter capability mode has
  ``cap_enter`` among the symbols its ELF file imports - the dynamic symbol
  table, which strip(1) keeps. Read here from the file itself: no tool
  whose output format varies (nm, readelf, elfdump) is parsed.
* the kernel: ``caph_enter()`` treats ENOSYS as success, and a kernel
  built without ``options CAPABILITY_MODE`` answers ENOSYS - bhyve would
  then run with no sandbox and say nothing. sys/kern/sys_capability.c
  declares ``FEATURE(security_capability_mode)`` exactly when that option
  is there (and ``FEATURE(security_capabilities)`` for the per-descriptor
  rights of ``options CAPABILITIES``, which ``caph_rights_limit()`` also
  skips on ENOSYS): ``sysctl -n kern.features.<name>`` prints 1 then, and
  fails (unknown oid) otherwise.
"""
import struct

from oslo_concurrency import processutils

#: what caph_enter() calls (and caph_enter itself, should a libcapsicum
#: ever export it instead of inlining it)
CAP_ENTER_SYMBOLS = ('cap_enter', 'caph_enter')
KERNEL_FEATURES = ('security_capability_mode', 'security_capabilities')
SYSCTL = '/sbin/sysctl'

_SHT_SYMTAB, _SHT_DYNSYM = 2, 11


class NotELF(ValueError):
    pass


def elf_symbols(path):
    """The names in the symbol tables (.dynsym and, when not stripped,
    .symtab) of the ELF file ``path``. NotELF if it is not one."""
    with open(path, 'rb') as f:
        data = f.read()
    if data[:4] != b'\x7fELF' or len(data) < 64:
        raise NotELF('%s is not an ELF file' % path)
    bits, order = data[4], {1: '<', 2: '>'}.get(data[5])
    if bits not in (1, 2) or order is None:
        raise NotELF('%s: unknown ELF class or byte order' % path)
    if bits == 2:
        shoff, = struct.unpack_from(order + 'Q', data, 0x28)
        shentsize, shnum = struct.unpack_from(order + 'HH', data, 0x3A)
        sh_fmt, sym_fmt = order + 'IIQQQQIIQQ', order + 'IBBHQQ'
    else:
        shoff, = struct.unpack_from(order + 'I', data, 0x20)
        shentsize, shnum = struct.unpack_from(order + 'HH', data, 0x2E)
        sh_fmt, sym_fmt = order + 'IIIIIIIIII', order + 'IIIBBH'
    try:
        sections = [struct.unpack_from(sh_fmt, data, shoff + i * shentsize)
                    for i in range(shnum)]
    except struct.error:
        raise NotELF('%s: truncated section headers' % path)
    names = set()
    for sh in sections:
        sh_type, offset, size, link, entsize = (
            sh[1], sh[4], sh[5], sh[6], sh[9])
        if sh_type not in (_SHT_SYMTAB, _SHT_DYNSYM) or not entsize:
            continue
        if link >= len(sections):
            raise NotELF('%s: bad string table index' % path)
        str_off, str_size = sections[link][4], sections[link][5]
        strtab = data[str_off:str_off + str_size]
        for i in range(size // entsize):
            entry = struct.unpack_from(sym_fmt, data, offset + i * entsize)
            name_at = entry[0]
            end = strtab.find(b'\0', name_at)
            if name_at and end > name_at:
                names.add(strtab[name_at:end].decode('ascii', 'replace'))
    return names


def binary_problem(bhyve_path):
    """Why ``bhyve_path`` would not enter capability mode, or None."""
    try:
        symbols = elf_symbols(bhyve_path)
    except (OSError, NotELF) as e:
        return 'cannot read %s to check its Capsicum support: %s' % (
            bhyve_path, e)
    if not symbols:
        return ('%s has no symbol table at all (a static, stripped build?): '
                'cannot tell whether it enters Capsicum capability mode'
                % bhyve_path)
    if not any(s in symbols for s in CAP_ENTER_SYMBOLS):
        return ('%s was built without Capsicum (WITHOUT_CAPSICUM: it '
                'references no cap_enter), so it never enters capability '
                'mode; use the base system\'s bhyve' % bhyve_path)
    return None


def kernel_problems(execute=None):
    """The Capsicum kernel features this kernel lacks, as messages."""
    execute = execute or processutils.execute
    lacking = []
    for feature in KERNEL_FEATURES:
        try:
            out, _ = execute(SYSCTL, '-n', 'kern.features.' + feature)
        except processutils.ProcessExecutionError:
            out = ''
        if out.strip() != '1':
            lacking.append(
                'kernel feature %s (kern.features.%s is not 1: the kernel '
                'lacks options %s, and bhyve\'s cap_enter would fail with '
                'ENOSYS, which bhyve ignores)' % (
                    feature, feature, 'CAPABILITY_MODE'
                    if feature == 'security_capability_mode'
                    else 'CAPABILITIES'))
    return lacking


def missing(bhyve_path, execute=None):
    """Everything that keeps bhyve from sandboxing itself ([] = none)."""
    problems = kernel_problems(execute)
    binary = binary_problem(bhyve_path)
    if binary:
        problems.append(binary)
    return problems
