"""What the running cloud is given: the catalog and service users, the test
guest as images, small flavors, and one shared network."""
import json
import os

import openstack

from allinone import configs
from allinone import layout
from allinone import procs

SERVICES = {   # catalog name -> (type, user)
    'glance': ('image', 'glance'),
    'placement': ('placement', 'placement'),
    'neutron': ('network', 'neutron'),
    'nova': ('compute', 'nova'),
}
IMAGES = {     # name -> (manifest key, disk format)
    'nb-guest': ('disk_qcow2', 'qcow2'),
    'nb-guest-raw': ('disk_raw', 'raw'),
}
FLAVORS = {    # name -> (id, MiB, vCPUs, GiB)
    'nb.tiny': ('42', 256, 1, 1),
    'nb.small': ('84', 320, 1, 2),
}
NETWORK = 'private'
SUBNET_CIDR = '10.20.0.0/24'


def keystone_bootstrap():
    procs.run([layout.venv_bin('keystone-manage'), '--config-file',
               layout.etc('keystone', 'keystone.conf'), 'bootstrap',
               '--bootstrap-password', layout.PASSWORD,
               '--bootstrap-admin-url', layout.url('keystone'),
               '--bootstrap-internal-url', layout.url('keystone'),
               '--bootstrap-public-url', layout.url('keystone'),
               '--bootstrap-region-id', layout.REGION],
              'keystone-manage bootstrap')


def admin():
    return openstack.connect(
        auth_url=layout.url('keystone'), username='admin',
        password=layout.PASSWORD, project_name='admin',
        user_domain_name='Default', project_domain_name='Default',
        region_name=layout.REGION, identity_api_version='3')


def catalog_and_users(conn):
    ident = conn.identity
    project = ident.find_project('service') or ident.create_project(
        name='service', domain_id='default')
    roles = {}
    for role in ('admin', 'service', 'manager', 'member', 'reader'):
        roles[role] = ident.find_role(role) or ident.create_role(name=role)
    for name, (stype, user) in SERVICES.items():
        u = ident.find_user(user, domain_id='default') or ident.create_user(
            name=user, password=layout.PASSWORD, domain_id='default')
        for role in ('admin', 'service'):
            ident.assign_project_role_to_user(project, u, roles[role])
        service = ident.find_service(name) or ident.create_service(
            name=name, type=stype)
        have = {e.interface for e in ident.endpoints(service_id=service.id)}
        for interface in ('public', 'internal'):
            if interface not in have:
                ident.create_endpoint(service_id=service.id,
                                      interface=interface,
                                      url=layout.url(name),
                                      region_id=layout.REGION)


def images(conn):
    with open(os.path.join(layout.GUEST, 'manifest.json')) as f:
        manifest = json.load(f)
    ids = {}
    for name, (key, fmt) in IMAGES.items():
        image = conn.image.find_image(name)
        if image is None or image.status != 'active':
            if image is not None:
                conn.image.delete_image(image)
            image = conn.image.create_image(
                name=name, filename=manifest[key], disk_format=fmt,
                container_format='bare', visibility='public', wait=True,
                timeout=300)
        ids[name] = image.id
    return ids


def flavors(conn):
    for name, (fid, ram, vcpus, disk) in FLAVORS.items():
        if conn.compute.find_flavor(name) is None:
            conn.compute.create_flavor(name=name, id=fid, ram=ram,
                                       vcpus=vcpus, disk=disk)


def network(conn):
    net = conn.network.find_network(NETWORK)
    if net is None:
        net = conn.network.create_network(
            name=NETWORK, shared=True, provider_network_type='flat',
            provider_physical_network=configs.FLAT_NETWORK)
    if not list(conn.network.subnets(network_id=net.id)):
        conn.network.create_subnet(network_id=net.id, ip_version=4,
                                   cidr=SUBNET_CIDR, enable_dhcp=False,
                                   name=NETWORK + '-subnet')
    return net.id


def openrc():
    text = ''.join('export %s=%s\n' % kv for kv in (
        ('OS_AUTH_URL', layout.url('keystone')),
        ('OS_USERNAME', 'admin'),
        ('OS_PASSWORD', layout.PASSWORD),
        ('OS_PROJECT_NAME', 'admin'),
        ('OS_USER_DOMAIN_NAME', 'Default'),
        ('OS_PROJECT_DOMAIN_NAME', 'Default'),
        ('OS_REGION_NAME', layout.REGION),
        ('OS_IDENTITY_API_VERSION', '3'),
    ))
    path = layout.path('openrc')
    with open(path, 'w') as f:
        f.write(text)
    return path
