"""mcpipe report: figures and an HTML page for runs and sweeps."""
