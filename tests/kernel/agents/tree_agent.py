"""A test agent with a child and a double-forked, setsid'd grandchild.

argv: MARKER_CHILD MARKER_GRANDCHILD PORT DONE_FILE
The child execs cat on its marker and connects to 127.0.0.1:PORT; the
grandchild (re-parented away from us) does the same with its own marker.
"""
import os
import subprocess
import sys
import time

marker_child, marker_gc, port, done = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
CONNECT = f"import socket; s=socket.create_connection(('127.0.0.1', {port}), timeout=5); s.close()"

subprocess.run(["/bin/cat", marker_child], check=True, stdout=subprocess.DEVNULL)
subprocess.run([sys.executable, "-c", CONNECT], check=True)

pid = os.fork()
if pid == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/bin/sh", ["sh", "-c", f"/bin/cat {marker_gc} >/dev/null; "
                             f"{sys.executable} -c \"{CONNECT}\"; echo ok > {done}"])
    os._exit(0)
os.waitpid(pid, 0)
deadline = time.time() + 20
while not os.path.exists(done) and time.time() < deadline:
    time.sleep(0.05)
time.sleep(0.2)
sys.exit(0 if os.path.exists(done) else 1)
