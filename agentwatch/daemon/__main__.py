"""`python -m agentwatch.daemon`: serve in the foreground."""
from .server import main

if __name__ == "__main__":
    main()
