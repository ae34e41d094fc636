"""The per-VM sandbox on Linux (docs/sandbox.md).

Each VM process is started by nova-bhyve-launcher (native/sandbox), which
drops every authority in a fixed order: its own cgroup, namespaces, its own
uid and gid, no capabilities, no_new_privs, Landlock. The modules here, one
concern each:

* launcher - the installed launcher binary, its argv and exit statuses
  (pure);
* spawn - runs the launcher and reads its status descriptor;
* uids - one uid per VM from [bhyve] sandbox_uid_range, persisted;
* cgroups - the per-VM cgroup (memory, pids, cpu), v2 or v1;
* features - what the host lacks for the sandbox.
"""


class SandboxError(Exception):
    """The sandbox could not be set up; nothing ran unsandboxed."""
