"""Where events go: JSON Lines files (the run log, --events FILE) and the console."""
