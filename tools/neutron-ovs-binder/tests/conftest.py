"""Test this tree's package, not a copy installed earlier (the installed
distribution is still needed: ML2 finds the driver by its entry point)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
