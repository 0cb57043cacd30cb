"""PyTorch <-> lavie-jax checkpoint conversion (naming tables, state dicts; CLI in a later issue)."""
