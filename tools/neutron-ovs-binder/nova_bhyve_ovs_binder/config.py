"""The [ovs_binder] options (oslo.config only)."""
from oslo_config import cfg

GROUP = 'ovs_binder'

OPTS = [
    cfg.StrOpt('ovsdb_connection',
               default='unix:/var/run/openvswitch/db.sock',
               help='The Open vSwitch database whose Interface rows '
                    '(external_ids:iface-id) tell which ports are plugged, '
                    'e.g. unix:/var/lib/nova-bhyve-cloud/ovs/db.sock.'),
    cfg.StrOpt('bridge_name', default='br-int',
               help='The integration bridge handed to Nova in '
                    'binding:vif_details (bridge_name).'),
    cfg.StrOpt('datapath_type', default='netdev',
               help='binding:vif_details datapath_type: netdev for the '
                    'userspace datapath, system for the kernel one.'),
    cfg.BoolOpt('require_ofport', default=True,
                help='A port counts as plugged only once ovs-vswitchd has '
                     'attached its interface (ofport > 0).'),
    cfg.IntOpt('resync_interval', default=30, min=0,
               help='Seconds between two full reconciliations of the port '
                    'statuses with the interfaces present (0: only after '
                    'each OVSDB (re)connection).'),
]


def register_opts(conf=cfg.CONF):
    conf.register_opts(OPTS, group=GROUP)


def list_opts():
    return [(GROUP, OPTS)]
