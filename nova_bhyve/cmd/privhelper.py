"""``nova-bhyve-privhelper NAME JSON_ARGS``: the FreeBSD transport's
privileged side (see nova_bhyve.privsep), run as root through sudo/doas."""
import json
import sys

from oslo_concurrency import processutils

from nova_bhyve import privsep
from nova_bhyve.privsep import net  # noqa: F401  (registers the entry points)


def main(argv=None):
    """``nova-bhyve-privhelper NAME JSON_ARGS``: run one registered
    privileged function (the FreeBSD transport; run by root)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in privsep.ENTRYPOINTS:
        sys.stderr.write('usage: nova-bhyve-privhelper {%s} JSON_ARGS\n'
                         % ','.join(sorted(privsep.ENTRYPOINTS)))
        return privsep.EXIT_REFUSED
    try:
        args = json.loads(argv[1])
        if not isinstance(args, list) or not all(
                a is None or isinstance(a, (str, int)) for a in args):
            raise privsep.Refused('arguments must be a JSON list of '
                                  'strings, integers and nulls')
        result = privsep.ENTRYPOINTS[argv[0]](*args)
    except (privsep.Refused, ValueError, TypeError) as e:
        sys.stderr.write('%s: %s\n' % (argv[0], e))
        return privsep.EXIT_REFUSED
    except processutils.ProcessExecutionError as e:
        sys.stderr.write(str(e))
        return 1
    sys.stdout.write(json.dumps(result) + '\n')
    return 0
