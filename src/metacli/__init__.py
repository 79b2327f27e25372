"""metacli: a config-driven command-line tool for meta-learning research."""

__version__ = "0.1.0"
