"""Methods: what trains when, on which split, what is shared with whom, and how it is aggregated.

Owns the registry of named methods (one small class per method). Every module of this package is
imported here, so a new method is one new file and nothing else. ``train.py`` never branches on
a method name: it asks the method. Knows nothing of process groups: a method communicates
through the ``Comm`` handle it is given.
"""
import importlib
import pkgutil

from comigs_dist.methods.base import (ROUTER_MODES, AfterTrainingContext, Method, SyncContext, get_method,
                                      known_methods, method_class, option_rows, register_method, sharing_plan)

# importing a method module registers it; sorted, so the registry is built in one fixed order
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["ROUTER_MODES", "AfterTrainingContext", "Method", "SyncContext", "get_method", "known_methods",
           "method_class", "option_rows", "register_method", "sharing_plan"]
