"""Process setup that must happen before JAX starts a backend: XLA:CPU options (`xla_cpu`), the garbage
collector's thresholds (`host_gc`), whether a backend has started (`jax_backend`), and `startup`: `on_import()`,
which `import lavie_jax` runs, and `configure()`, which the commands call first thing. Nothing here imports jax."""
