"""Re-export of nova_bhyve's driver where Nova looks for drivers.

Nova imports ``nova.virt.<compute_driver>``, so with this module installed
operators set ``[DEFAULT] compute_driver = bhyve.BhyveDriver``.
"""
from nova_bhyve.driver import BhyveDriver

__all__ = ['BhyveDriver']
