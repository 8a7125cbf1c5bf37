"""A pre-warmed `python3` for `run.sh --cpu-smoke`: the same command lines, without ~6 s of imports each.

    python3 benchmarks/gpu/warm_python.py serve SOCKET &          # imports torch, timm, DeepSpeed once
    python3 benchmarks/gpu/warm_python.py run SOCKET -m pipeline.bench ...   # = python3 -m pipeline.bench ...
    python3 benchmarks/gpu/warm_python.py run SOCKET train/main.py ...       # = python3 train/main.py ...

Why: the smoke runs a dozen Python commands whose imports (torch, timm, DeepSpeed) cost more CPU than
their tiny work; tests/test_gpu_script.py runs the smoke in the suite, which must stay short. On the GPU
machine run.sh calls plain python3 (imports are cheap next to a measurement).

How (decisions): the server forks a child per request (nothing is computed before the fork, so no thread
pool is inherited; requests may run side by side, as tests/test_resume_processes.py runs them); the child
takes the client's stdout/stderr (passed over the Unix socket), working folder and environment, then
runs the module (`-m`), script or `-c` code as `__main__` with the client's argv. The client relays SIGTERM/SIGINT to the child (so `timeout` stops the real work) and exits with
the child's exit code (128 + signal when killed, as a shell reports it).
"""
from __future__ import annotations

import json
import os
import runpy
import signal
import socket
import sys

PRELOAD = ("torch", "torchvision", "timm", "deepspeed", "ffcv", "matplotlib.pyplot", "pytest")


def serve(path: str) -> None:
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the handlers below are reaped without waiting
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()
    while True:
        connection, _ = server.accept()
        message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 2)
        request = json.loads(message)
        if request.get("stop"):
            return
        if os.fork() == 0:  # a handler per request, so that requests run side by side
            server.close()
            _handle(connection, request, fds)
        connection.close()
        for fd in fds:
            os.close(fd)


def _handle(connection: socket.socket, request: dict, fds: list[int]) -> None:
    """Fork the worker, tell the client its pid, wait for it, tell the client its exit code."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        connection.close()
        _child(request, fds)
    connection.sendall(f"{pid}\n".encode())
    _, status = os.waitpid(pid, 0)
    connection.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
    os._exit(0)


def _child(request: dict, fds: list[int]) -> None:
    code = 1
    try:
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path[:0] = [p for p in request["env"].get("PYTHONPATH", "").split(":") if p]
        code = _run(request["argv"])
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _run(argv: list[str]) -> int:
    """`python3 ARGV` in this process: `-m module`, `-c code` or a script path, as __main__."""
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = list(argv)
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        runpy.run_path(argv[0], run_name="__main__")
    return 0


def run(path: str, argv: list[str]) -> int:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}
    socket.send_fds(client, [json.dumps(request).encode()], [1, 2])
    replies = client.makefile()
    child = int(replies.readline())
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda s, frame: os.kill(child, s))
    code = int(replies.readline())
    return 128 - code if code < 0 else code


def stop(path: str) -> None:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    socket.send_fds(client, [json.dumps({"stop": True}).encode()], [1, 2])


if __name__ == "__main__":
    command, socket_path, *rest = sys.argv[1:]
    if command == "serve":
        serve(socket_path)
    elif command == "stop":
        stop(socket_path)
    else:
        sys.exit(run(socket_path, rest))
