"""Specs shipped with opdsl (YAML data; see opdsl.loader.shipped_specs)."""
