"""nova-bhyve: an OpenStack Nova compute driver for bhyve, with a QEMU
backend."""
