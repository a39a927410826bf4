"""`furnace serve` for the reference scripts: started on a free loopback port, its address read
from what it prints, stopped on exit."""

import contextlib
import subprocess


@contextlib.contextmanager
def furnace_server(furnace: str, checkpoint: str, *flags: str):
    """Yields the server's base URL (`http://127.0.0.1:PORT`) once it is serving."""
    server = subprocess.Popen([furnace, "serve", "--checkpoint", checkpoint, "--port", "0", *flags], stdout=subprocess.PIPE, text=True)
    try:
        address = None
        for line in server.stdout:
            if line.startswith("listening on "):
                address = line.split()[2]
            if line.startswith("serving"):
                break
        assert address, "the server printed no address"
        yield address
    finally:
        server.terminate()
        server.wait()
