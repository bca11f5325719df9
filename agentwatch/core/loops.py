"""An asyncio loop in a thread of its own, as the harness's servers (the
LLM gateway, the broker) run theirs: started once its opening coroutine
has run (listening sockets bound, so a port is known and an error is the
caller's), stopped after a shutdown coroutine."""
import asyncio
import sys
import threading

if sys.version_info >= (3, 11):
    async def within(aw, timeout):
        """await aw; asyncio.TimeoutError after timeout s. On 3.11+ a timer
        on the caller's own task (asyncio.timeout): wait_for there makes a
        task per call, which costs a server more than a short request."""
        async with asyncio.timeout(timeout):
            return await aw
else:                                   # pragma: no cover (3.10)
    within = asyncio.wait_for


def start_loop_thread(name, opener, owner=None):
    """A new loop run forever in daemon thread `name`, after the coroutine
    function opener() ran on it (owner.loop is the loop by then, when an
    owner is given). -> (loop, thread); opener's exception is raised here,
    with the loop closed and the thread gone."""
    ready, failure, box = threading.Event(), [], []

    def main():
        loop = asyncio.new_event_loop()
        box.append(loop)
        if owner is not None:
            owner.loop = loop
        try:
            loop.run_until_complete(opener())
        except BaseException as e:
            failure.append(e)
            ready.set()
            loop.close()
            return
        ready.set()
        loop.run_forever()
        loop.close()
    thread = threading.Thread(target=main, name=name, daemon=True)
    thread.start()
    ready.wait()
    if failure:
        thread.join()
        raise failure[0]
    return box[0], thread


def stop_loop_thread(loop, thread, shutdown=None, timeout=10):
    """Run the coroutine shutdown (if any) on the loop, stop it, join its
    thread. A stuck shutdown does not keep the loop alive."""
    if shutdown is not None:
        try:
            asyncio.run_coroutine_threadsafe(shutdown, loop).result(timeout)
        except Exception:
            pass
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout)
