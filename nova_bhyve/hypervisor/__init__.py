"""Hypervisor backends behind one interface (base.Hypervisor); backends.get
chooses one. Backends meet only through base."""
