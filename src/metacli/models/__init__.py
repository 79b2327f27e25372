"""Models: one module per ``conf/model/<name>.yaml``; plain nn.Modules used functionally."""
