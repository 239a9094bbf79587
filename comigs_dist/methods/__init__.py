"""Methods: what trains when, on which split, what is shared with whom, and how it is aggregated.

Owns the registry of named methods (one small class per method, one file each). ``train.py``
never branches on a method name: it asks the method. Knows nothing of process groups: a method
aggregates through the ``Comm`` handle it is given.
"""
from comigs_dist.methods.base import Method, SyncContext, get_method, known_methods, register_method

# importing a method module registers it
from comigs_dist.methods import comigs, fedavg, local  # noqa: E402,F401

__all__ = ["Method", "SyncContext", "get_method", "known_methods", "register_method"]
