"""The stage configs of lavie-jax, installed as `lavie_jax.configs` (setup.py maps this folder onto that name).

`--config NAME[:variant]` loads `NAME.py` from here (lavie_jax.cli.config_flags): base, interpolation and vsr are
the three stages (variants: full = official size, tiny = CPU sized, demo = what `make demo` trains), demo holds the
demo's own settings, common the values the stages share. A copy of one of these files is a config of your own
(`--config my_base.py:tiny`); it imports the shared pieces as `from lavie_jax.configs import common`.

The library never imports this package: these files are the values, the library is the code that reads them.
"""
