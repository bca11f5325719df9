"""The policy engine's judgement rate, without the kernel (no root needed).

    .venv/bin/python bench/matchers.py [N] [POLICY]

Judgements per second of CompiledPolicy.check_file (uncached and cached)
and check_connect over a mix of allowed and denied events, under POLICY
(default: policies/coding-agent.yaml of this checkout). Prints one JSON
object. (It lived in agentwatch/policy/compile.py, which read the policy
from a path that exists only in a checkout, not in an installed package.)
"""
import json
import os
import sys
import time

TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TREE)

from agentwatch.policy import load  # noqa: E402
from agentwatch.policy.compile import compile_policy  # noqa: E402

PATHS = ["/usr/lib/x86_64-linux-gnu/libc.so.6", "/etc/ld.so.cache", "/home/u/.ssh/id_rsa",
         "/work/ws/src/main.py", "/work/ws/.env", "/tmp/t/x", "/etc/passwd",
         "/proc/self/root/etc/shadow", "/usr/share/zoneinfo/UTC", "/var/log/syslog"]
ADDRS = [("inet", "151.101.0.223", 443), ("inet", "127.0.0.1", 8081),
         ("inet6", "::ffff:10.1.2.3", 80), ("inet", "8.8.8.8", 53), ("inet6", "2a04:4e42::223", 443)]


def bench(n, policy_path):
    cp = compile_policy(load(policy_path), {"WORKSPACE": "/work/ws", "HOME": "/home/u", "TMPDIR": "/tmp"})
    cp.domain_ips = {"pypi.org": {"151.101.0.223"}, "api.anthropic.com": {"160.79.104.10"}}
    accesses = [{"read"}, {"write", "create"}]
    results = {"n": n}

    def timed(label, fn):
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        results[label] = round(n / (time.perf_counter() - start))

    def file_uncached(i):
        cp._file_cache.clear()
        cp.check_file(PATHS[i % len(PATHS)] + str(i % 7), accesses[i & 1])

    timed("check_file_per_s", file_uncached)
    timed("check_file_cached_per_s", lambda i: cp.check_file(PATHS[i % len(PATHS)], accesses[i & 1]))
    timed("check_connect_per_s", lambda i: cp.check_connect(*ADDRS[i % len(ADDRS)], "tcp"))
    return results


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    policy = sys.argv[2] if len(sys.argv) > 2 else os.path.join(TREE, "policies", "coding-agent.yaml")
    print(json.dumps(bench(n, policy)))
