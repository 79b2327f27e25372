"""Task distributions: one module per ``conf/task/<name>.yaml``."""
