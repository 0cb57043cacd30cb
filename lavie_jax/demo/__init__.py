"""`make demo`: the whole system trained and sampled on a laptop-class CPU (`python -m lavie_jax.demo`).

  main        the phases: data, encoders, precompute, lavie-train x 3, lavie-sample, evaluation
  encoders    the demo's autoencoder (trained here) and text encoder (random), written as a pipeline directory
  data        the moving_shapes sources and the per-stage precomputed latents
  evaluate    colour and direction of a video's foreground from its pixels, against the prompt
  overview    the grid image of every prompt's frames at every stage
"""
