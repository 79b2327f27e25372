"""Meta-learning algorithms: one module per ``conf/algo/<name>.yaml``."""
