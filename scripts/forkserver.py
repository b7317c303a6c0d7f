"""Runs Python scripts in forks of one process that has imported torch and transformers.

The integration tests run transformers' side of a comparison (hf_checkpoint.py,
hf_reference.py, ...) dozens of times; importing torch and transformers costs
each run several seconds of the two cores. This server imports them once and
forks a child per run, which starts with them imported and then runs the
script as `python SCRIPT ARGS...` (or `python -c CODE ARGS...`) would.

Usage: python forkserver.py SOCKET. Prints "ready" once listening on the Unix
socket SOCKET; exits when its standard input closes (the tests' process has
ended). Each connection sends one JSON line:

    {"argv": [SCRIPT or "-c", CODE, ARGS...], "cwd": DIR, "env": {...},
     "stdout": FILE, "stderr": FILE}

and gets back one line, the run's exit status, once the child has ended; the
child's standard output and error are written into the two files.
"""

import json
import os
import runpy
import select
import signal
import socket
import sys
import traceback


def preload():
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    # The modules transformers imports lazily on a model's first use.
    import transformers.generation  # noqa: F401
    import transformers.masking_utils  # noqa: F401
    import transformers.modeling_utils  # noqa: F401

    del transformers


def run(connection):
    """In the child: runs the request's script and answers its exit status."""
    request = json.loads(connection.makefile("r").readline())
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    argv = request["argv"]
    status = 0
    try:
        if argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
        else:
            sys.argv = list(argv)
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exit:
        if exit.code is None:
            status = 0
        elif isinstance(exit.code, int):
            status = exit.code
        else:
            print(exit.code, file=sys.stderr)
            status = 1
    except BaseException:
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    connection.sendall(f"{status}\n".encode())
    os._exit(status)


def main():
    preload()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sys.argv[1])
    server.listen(64)
    # Children are reaped by the kernel; each resets this for its own.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    print("ready", flush=True)
    while True:
        readable, _, _ = select.select([server, sys.stdin], [], [])
        if sys.stdin in readable and not os.read(sys.stdin.fileno(), 4096):
            return
        if server in readable:
            connection, _ = server.accept()
            if os.fork() == 0:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                server.close()
                try:
                    run(connection)
                finally:
                    os._exit(1)
            connection.close()


if __name__ == "__main__":
    main()
