"""Device mesh, logical-axis rules and shardings (the only place that knows mesh axis names).

Mesh axes are `('data', 'fsdp', 'context', 'tensor')`; sizes come from the config (`mesh.shape`, one entry may be
-1 = all remaining devices). Params carry logical axis names (see `lavie_jax.models.layers`) and the models mark
their activations with logical names at block boundaries (`constrain`); one rules table in the config maps both to
mesh axes, e.g. `(('embed', 'fsdp'), ('heads', 'tensor'), ('activation_frames', 'context'), ...)`. A dimension the
mesh axes of its rule do not divide cannot follow the rule: a param dimension then stays replicated and an
activation dimension unconstrained, and the first time each such case comes up it is logged (once), so a
misfitting rules table or mesh is seen rather than silently ignored.

What the axes do: 'fsdp' and 'data' split the batch (`BATCH_AXES`); 'fsdp' also shards params (and optimizer
state) over model channels; 'tensor' shards attention heads, MLP and conv output channels; 'context' splits the
frames of every video activation (`activation_frames`), so one long clip's activations spread over devices (GSPMD
gathers what temporal layers and frame-pooled norms need).
"""

from lavie_jax.parallel.mesh import (BATCH_AXES, MESH_AXES, failed_processes, gather_text, initialize_distributed,
                                     make_mesh, mesh_shape)
from lavie_jax.parallel.sharding import (ACTIVATION_VIDEO, DEFAULT_RULES, Rules, batch_sharding, constrain,
                                         logical_to_spec, place_state, shard_module, state_shardings, to_global,
                                         to_host)

__all__ = ["ACTIVATION_VIDEO", "BATCH_AXES", "DEFAULT_RULES", "MESH_AXES", "Rules", "batch_sharding", "constrain",
           "failed_processes", "gather_text", "initialize_distributed", "logical_to_spec", "make_mesh", "mesh_shape",
           "place_state", "shard_module", "state_shardings", "to_global", "to_host"]
