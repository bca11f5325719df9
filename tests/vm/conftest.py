"""tests/vm: the BPF LSM enforcement path, tested inside a VM.

test_lsm_vm.py (host side) boots Debian's stock kernel with lsm=...,bpf under
QEMU (tests/vm/run_vm_tests.sh) and reports every guest test. The guest tests
in guest/ need that kernel, so on any other host they are not collected: the
VM runner sets AGENTWATCH_VM_GUEST=1 inside the guest.
"""
import os

collect_ignore = [] if os.environ.get("AGENTWATCH_VM_GUEST") == "1" else ["guest"]
