"""Video metrics: FVD (`fvd`, `frechet`), the video Inception Score (`inception_score`) and CLIPSIM (`clipsim`).
Feature networks live in `lavie_jax.models`, their weight readers in `lavie_jax.convert`; the metric math runs on
the host in float64."""
