"""The ML2 mechanism driver ``bhyve_ovs``: binds ports to an OVS bridge
and plays the L2 agent's part for their status (see README.md)."""
from neutron.db import provisioning_blocks
from neutron_lib import constants
from neutron_lib import context as n_context
from neutron_lib import exceptions as n_exc
from neutron_lib.api.definitions import portbindings
from neutron_lib.callbacks import resources
from neutron_lib.plugins import directory
from neutron_lib.plugins.ml2 import api
from oslo_config import cfg
from oslo_log import log as logging
from oslo_utils import uuidutils

from nova_bhyve_ovs_binder import config
from nova_bhyve_ovs_binder import ovsdb_watch
from nova_bhyve_ovs_binder import worker

LOG = logging.getLogger(__name__)

# the entry point's name (neutron.ml2.mechanism_drivers)
NAME = 'bhyve_ovs'

BINDABLE_TYPES = (constants.TYPE_FLAT, constants.TYPE_VLAN,
                  constants.TYPE_VXLAN, constants.TYPE_GENEVE,
                  constants.TYPE_LOCAL)


class BhyveOVSMechanismDriver(api.MechanismDriver):
    """Binds every port of vnic_type normal, on any host, to the first
    segment of a type in BINDABLE_TYPES (vif_type ovs, the configured
    bridge); an OVSDB watcher (get_workers) then reports the ports
    plugged or not."""

    def initialize(self):
        config.register_opts()
        self.conf = cfg.CONF.ovs_binder
        self.vif_details = {
            portbindings.CAP_PORT_FILTER: False,
            portbindings.OVS_HYBRID_PLUG: False,
            portbindings.VIF_DETAILS_BRIDGE_NAME: self.conf.bridge_name,
            portbindings.OVS_DATAPATH_TYPE: self.conf.datapath_type,
            portbindings.VIF_DETAILS_CONNECTIVITY: self.connectivity,
        }

    @property
    def connectivity(self):
        return portbindings.CONNECTIVITY_L2

    def bind_port(self, context):
        vnic_type = context.current.get(portbindings.VNIC_TYPE,
                                        portbindings.VNIC_NORMAL)
        if vnic_type != portbindings.VNIC_NORMAL:
            LOG.debug('port %s: vnic_type %s, not binding',
                      context.current['id'], vnic_type)
            return
        for segment in context.segments_to_bind:
            if segment[api.NETWORK_TYPE] in BINDABLE_TYPES:
                # no status: the port stays DOWN until its interface shows
                context.set_binding(segment[api.ID], portbindings.VIF_TYPE_OVS,
                                    dict(self.vif_details))
                LOG.debug('port %s bound on host %s to %s segment %s',
                          context.current['id'], context.host,
                          segment[api.NETWORK_TYPE], segment[api.ID])
                return
        LOG.debug('port %s: no segment of a type in %s',
                  context.current['id'], ', '.join(BINDABLE_TYPES))

    def get_workers(self):
        # called in every process; started only in neutron-periodic-workers
        return [worker.WatcherWorker(self._make_watcher)]

    def _make_watcher(self):
        return ovsdb_watch.InterfaceWatcher(
            self.conf.ovsdb_connection, PortStatusReporter(self),
            require_ofport=self.conf.require_ofport,
            resync_interval=self.conf.resync_interval)


class PortStatusReporter:
    """The watcher's handler: port statuses from the interfaces present,
    for ports this driver bound only."""

    def __init__(self, driver, plugin=None):
        self.driver = driver
        self._plugin = plugin

    @property
    def plugin(self):
        if self._plugin is None:
            self._plugin = directory.get_plugin()
        return self._plugin

    def _name(self):
        """This driver's name in [ml2] mechanism_drivers."""
        drivers = getattr(self.plugin, 'mechanism_manager', None)
        for name, drv in getattr(drivers, 'mech_drivers', {}).items():
            if drv.obj is self.driver:
                return name
        return NAME

    def _ours(self, port, name=None):
        details = port.get(portbindings.VIF_DETAILS) or {}
        bound = details.get(portbindings.VIF_DETAILS_BOUND_DRIVERS) or {}
        return (port.get(portbindings.VIF_TYPE) ==
                portbindings.VIF_TYPE_OVS and
                bound.get('0') == (name or self._name()))

    def _port(self, ctx, port_id):
        """The port if this driver bound it, else None."""
        if not uuidutils.is_uuid_like(port_id):
            return None
        try:
            port = self.plugin.get_port(ctx, port_id)
        except n_exc.PortNotFound:
            return None
        return port if self._ours(port) else None

    def plugged(self, port_id):
        ctx = n_context.get_admin_context()
        port = self._port(ctx, port_id)
        if port is None:
            LOG.debug('interface for port %s: not a port bound by %s',
                      port_id, NAME)
            return
        self._activate(ctx, port)

    def unplugged(self, port_id):
        ctx = n_context.get_admin_context()
        port = self._port(ctx, port_id)
        if port is not None:
            self._deactivate(ctx, port)

    def synced(self, port_ids):
        ctx = n_context.get_admin_context()
        name = self._name()
        for port in self.plugin.get_ports(ctx):
            if not self._ours(port, name):
                continue
            if port['id'] in port_ids:
                if port['status'] != constants.PORT_STATUS_ACTIVE and \
                        port['admin_state_up']:
                    self._activate(ctx, port)
            elif port['status'] == constants.PORT_STATUS_ACTIVE:
                self._deactivate(ctx, port)

    @staticmethod
    def _activate(ctx, port):
        # what an L2 agent's update_device_up does: the port goes ACTIVE
        # (ML2's PROVISIONING_COMPLETE handler) and Nova gets
        # network-vif-plugged
        LOG.info('port %s (host %s) plugged: L2 provisioning complete',
                 port['id'], port[portbindings.HOST_ID])
        provisioning_blocks.provisioning_complete(
            ctx, port['id'], resources.PORT,
            provisioning_blocks.L2_AGENT_ENTITY)

    def _deactivate(self, ctx, port):
        if port['status'] == constants.PORT_STATUS_DOWN:
            return
        LOG.info('port %s (host %s) unplugged: DOWN', port['id'],
                 port[portbindings.HOST_ID])
        # Nova gets network-vif-unplugged
        self.plugin.update_port_status(ctx, port['id'],
                                       constants.PORT_STATUS_DOWN,
                                       port[portbindings.HOST_ID])
