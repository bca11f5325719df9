"""agentwatch: watch and contain AI agents with eBPF."""
__version__ = "0.1.0"
