"""Services layer: the `uvmbus` CLI and the daemons (net bridge, block export)."""
