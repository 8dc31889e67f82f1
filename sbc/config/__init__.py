"""The YAML configuration: typed schema and validation with exact locations."""
