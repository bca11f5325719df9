"""BPF C sources of the sensors; located at run time by agentwatch.sensors."""
