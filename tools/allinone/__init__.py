"""An all-in-one OpenStack around nova-bhyve on one host (tools/cloud)."""
