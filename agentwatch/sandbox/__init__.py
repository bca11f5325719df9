"""The agent's side of a run: its cgroup and the launcher that starts it."""
