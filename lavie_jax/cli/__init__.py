"""What every command shares: stage configs from the command line (`config_flags`: `--config NAME[:variant]` for a
packaged config, `--config FILE[:variant]` for a file, and `--config.a.b=value` overrides)."""
