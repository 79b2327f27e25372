"""Models (``model=``): one module per option, registered by its name; plain nn.Modules
used functionally."""
