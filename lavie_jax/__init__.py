"""lavie-jax: the LaVie cascaded video diffusion system in JAX / Flax NNX (channels-last `[B, F, H, W, C]`).

Importing the package sets lavie-jax's XLA:CPU options (`lavie_jax.runtime.xla_cpu`) in XLA_FLAGS when no JAX
backend has started yet, keeping any value the user set; it imports nothing of jax
(`lavie_jax.runtime.startup.on_import`). Import lavie_jax before using jax, or call
`lavie_jax.runtime.startup.configure()` first thing in the program. For calls without NNX's per-call overhead, see
`lavie_jax.models.compiled`.
"""

from lavie_jax.runtime import startup as _startup

_startup.on_import()
