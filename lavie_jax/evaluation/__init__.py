"""Video metrics: FVD (I3D features, Frechet distance), IS (UCF-101 C3D) and CLIPSIM (CLIP ViT); host-side math
in float64. `lavie-eval` (cli.py) and training's evaluation measure folders of videos through folders.py."""
