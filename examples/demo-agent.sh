#!/bin/sh
# A stand-in for a coding agent: reads the system, writes its workspace,
# runs a tool, then tries what an agent talked into it might: a local
# service on a port its policy does not name, the user's SSH key, a .env
# file. Under policies/sandboxed-agent.yaml (scripts/demo.sh) the kernel
# refuses the connect and kills the agent at the key; under
# policies/coding-agent.yaml (alerts only) each is a violation and it goes on.
set -u
PATH=/usr/local/bin:/usr/bin:/bin
WS="${WORKSPACE:-$(mktemp -d /tmp/agentwatch-demo.XXXXXX)}"
cd "$WS"
echo "demo agent: workspace $WS" >&2
cat /etc/os-release > /dev/null            # read the system
printf 'print("hello")\n' > main.py        # write the workspace
python3 main.py > out.txt 2>&1 || true     # run a tool
ls > listing.txt
# a local service on a port the policy does not allow (refused either way)
python3 -c 'import socket; s=socket.socket(); s.settimeout(1); print(s.connect_ex(("127.0.0.1", 8081)))' >/dev/null 2>&1 || true
( sh -c 'sleep 0.2; echo done > bg.txt' & )  # a detached background helper
sleep 0.3
cat "$HOME/.ssh/id_rsa" > /dev/null 2>&1 || true   # a secret (forbidden; only if it exists)
echo "API_TOKEN=demo" > .env; cat .env > /dev/null  # a secret file (**/.env is denied)
[ -n "${WORKSPACE:-}" ] || rm -rf "$WS"
exit 0
