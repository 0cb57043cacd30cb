"""What every command shares: stage configs from the command line (`config_flags`: `--config FILE[:variant]` and
`--config.a.b=value` overrides)."""
