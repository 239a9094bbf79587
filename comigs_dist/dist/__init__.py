"""Communication between users: one package, one concern per module.

- ``env``          the launcher's environment (the only reader of ``os.environ``), the host's processes
- ``topology``     ranks, the users each rank simulates, every process group (built once)
- ``failures``     a failed collective named by the user that died or hung (``PeerFailure``)
- ``buffers``      a group's tensors as one flat buffer
- ``collectives``  objects, scalars, the barrier, the shape handshake
- ``comm``         ``Comm``: what methods use (means, sums, gathers, broadcasts) and the bytes

Knows nothing of models or methods.
"""
from comigs_dist.dist.buffers import flatten, pack_flat, packed_buffer, unflatten_into
from comigs_dist.dist.collectives import (all_gather_objects, barrier, broadcast_object, check_group_shapes,
                                          sum_scalars)
from comigs_dist.dist.comm import (MODES, SECURE_AGG_WIRE, Comm, CommStats, collective_bytes, collectives,
                                   payload_bytes, round_bytes)
from comigs_dist.dist.env import (agent_store_value, env_get, env_rank, env_world_size, export_rank_env, free_port,
                                  job_tag, pid_alive, restart_count, usable_cpus)
from comigs_dist.dist.failures import PeerFailure, report_failure
from comigs_dist.dist.topology import Topology, init_distributed, place_users, shutdown

__all__ = ["MODES", "SECURE_AGG_WIRE", "Comm", "CommStats", "PeerFailure", "Topology", "agent_store_value",
           "all_gather_objects", "barrier",
           "broadcast_object", "check_group_shapes", "env_get", "env_rank", "env_world_size", "export_rank_env",
           "collective_bytes", "collectives", "flatten", "free_port", "init_distributed", "job_tag", "pack_flat",
           "packed_buffer", "payload_bytes",
           "pid_alive", "place_users", "report_failure", "restart_count", "round_bytes", "shutdown", "sum_scalars",
           "unflatten_into", "usable_cpus"]
