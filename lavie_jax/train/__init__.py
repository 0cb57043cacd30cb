"""Training: optimizer, param groups and EMA (`optim`), metrics writers (`metrics`); step and loop build on them."""
