"""A stand-in for oslo.concurrency's processutils.execute, for commands that
cannot run here (bhyvectl): it answers as processutils does - (stdout,
stderr), or ProcessExecutionError for an exit status ``check_exit_code``
does not allow - and the mock records each argv.

    with fake_execute.patch(rc=1, err='vm_open: No such') as execute:
        ...
    assert fake_execute.argvs(execute) == [['/usr/sbin/bhyvectl', ...]]

``behaviour(argv)`` (argv a list) may instead return (rc, out, err) per
command, and act as the command would (write files). With ``only`` (a
program path) other commands run for real. The mock is autospecced on the
real execute, so an argument it does not take fails the call.
"""
from unittest import mock

from oslo_concurrency import processutils


def answer(argv, rc=0, out='', err='', check_exit_code=0, **kwargs):
    """processutils.execute's result for ``argv`` ending with ``rc``."""
    if check_exit_code is False:
        return out, err
    if check_exit_code is True or check_exit_code is None:
        allowed = [0]
    elif isinstance(check_exit_code, int):
        allowed = [check_exit_code]
    else:
        allowed = list(check_exit_code)
    if rc not in allowed:
        raise processutils.ProcessExecutionError(
            exit_code=rc, stdout=out, stderr=err, cmd=' '.join(argv))
    return out, err


def patch(behaviour=None, rc=0, out='', err='', only=None):
    """mock.patch of processutils.execute (the module attribute, which
    nova_bhyve's bhyve modules call); the started mock is the execute."""
    real = processutils.execute

    def execute(*argv, **kwargs):
        if only is not None and argv[0] != only:
            return real(*argv, **kwargs)
        result = behaviour(list(argv)) if behaviour else (rc, out, err)
        return answer(list(argv), *result, **kwargs)
    return mock.patch.object(processutils, 'execute', autospec=True,
                             side_effect=execute)


def argvs(execute):
    """The argv (a list) of each call the patched execute received."""
    return [list(c.args) for c in execute.call_args_list]
