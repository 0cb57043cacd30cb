"""PyTorch <-> lavie-jax checkpoint conversion: naming tables (`keymap`), in-memory state dicts (`state_dict`),
streaming file readers (`torch_files`), 2D -> 3D inflation (`inflate`), export (`export`), `lavie-convert` (`cli`).
"""
