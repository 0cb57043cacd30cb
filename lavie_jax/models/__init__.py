"""NNX modules of lavie-jax (no file I/O). Channels-last `[B, F, H, W, C]` throughout."""

from lavie_jax.models.arch import ConfigError, UNetArch, arch_from_config
from lavie_jax.models.compiled import CompiledModel, compiled
from lavie_jax.models.clip import (TEXT_ENCODER_CONFIGS, CLIPTextEncoder, TextEncoderConfig, TextEncoderOutput,
                                   abstract_text_encoder, build_text_encoder, text_encoder_config_from_dict)
from lavie_jax.models.unet import UNet3D, abstract_unet, build_unet, count_params, param_count
from lavie_jax.models.vae import (VAE_CONFIGS, AutoencoderKL, DiagonalGaussian, VAEConfig, abstract_vae, build_vae,
                                  vae_config_from_dict)

__all__ = [
    "ConfigError", "UNetArch", "arch_from_config", "CompiledModel", "compiled",
    "UNet3D", "abstract_unet", "build_unet", "count_params", "param_count",
    "AutoencoderKL", "DiagonalGaussian", "VAEConfig", "VAE_CONFIGS", "abstract_vae", "build_vae",
    "vae_config_from_dict",
    "CLIPTextEncoder", "TextEncoderConfig", "TextEncoderOutput", "TEXT_ENCODER_CONFIGS", "abstract_text_encoder",
    "build_text_encoder", "text_encoder_config_from_dict",
]
