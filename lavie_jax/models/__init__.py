"""NNX modules of lavie-jax (no file I/O). Channels-last `[B, F, H, W, C]` throughout."""

from lavie_jax.models.arch import STAGES, ConfigError, UNetArch, arch_from_config
from lavie_jax.models.official import OFFICIAL_PARAM_COUNTS, official_unet_config
from lavie_jax.models.unet import UNet3D, abstract_unet, build_unet, count_params, param_count

__all__ = [
    "STAGES", "ConfigError", "UNetArch", "arch_from_config", "OFFICIAL_PARAM_COUNTS", "official_unet_config",
    "UNet3D", "abstract_unet", "build_unet", "count_params", "param_count",
]
