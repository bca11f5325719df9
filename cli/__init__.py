"""agentwatch command line (installed as the agentwatch_cli package)."""
