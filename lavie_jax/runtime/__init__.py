"""Process setup that must happen before JAX starts a backend: XLA:CPU options (`xla_cpu`), the garbage
collector's thresholds (`host_gc`), and `startup.configure()`, which the commands call first thing. Nothing here
imports jax."""
