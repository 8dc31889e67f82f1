"""The YAML configuration: typed schema and validation with exact locations.

`sbc.config.schema` holds the frozen dataclasses (`Config` and its sections);
`sbc.config.loader` reads a file into them (`load_config`, `load_config_text`,
`default_config`, `check_config`) or raises `ConfigError` with `file:line: reason`
problems. `default.yaml` is the embedded default used by `sbc run` without --config.
"""
