"""The node agent (``skyport agent``): runs on a node, connects out to the core, runs its jobs there."""
