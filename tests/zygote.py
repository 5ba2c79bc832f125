"""A pre-imported parent that forks: the tests' one-process recipe runs and spawned ranks start in
milliseconds instead of paying a fresh interpreter and seconds of imports (torch, Hydra, torchdata)
each. What a test checks is behaviour (signals, exit statuses, files), not interpreter start-up;
tests about start-up itself (signals during the imports) still start a fresh interpreter.

Server: `python tests/zygote.py SOCKET` imports what the recipe and the library import (never
running a torch op, starting a thread or installing a signal handler, so a fork is as clean as a
fresh start), then serves requests one at a time: each sends stdin/stdout/stderr (SCM_RIGHTS) and a
pickled request {argv, env, cwd, new_session, sys_path, call}. The server forks; the child takes
the fds, environment, directory and session, then runs the script as __main__ (or `call`: a
function and its arguments) and ends as an interpreter would (non-daemon threads joined, atexit
handlers run, SystemExit's code, a KeyboardInterrupt as a SIGINT death). The server answers the
child's pid, then its exit status (`-N` for a signal, as subprocess reports it) when it is reaped.

Client: `Forked`, the part of subprocess.Popen the tests use (pid, poll, wait, communicate, kill,
send_signal, returncode, stdout).
"""

from __future__ import annotations

import array
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Any, Optional

PRELOAD = ("torch", "torch.distributed", "torch.distributed.checkpoint", "torch.distributed.fsdp",
           "torch.nn.parallel", "torch.multiprocessing", "numpy", "hydra", "hydra.utils", "omegaconf",
           "torchdata.stateful_dataloader", "preemptible", "preemptible.run.facade", "preemptible.checkpoint.writer",
           "preemptible.checkpoint.reader", "preemptible.stopping.signal_handler", "preemptible.stopping.notices",
           "preemptible.stopping.decision", "preemptible.observe.export", "preemptible.distributed.parallel",
           "finetune_parts.model", "finetune_parts.data", "finetune_parts.lr", "finetune_parts.settings",
           "finetune_parts.hydra_glue")
HEADER = struct.Struct("!I")


# -- the server ---------------------------------------------------------------------------------

def serve(path: str) -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    waiting: dict[int, socket.socket] = {}
    parent = os.getppid()
    while True:
        if os.getppid() != parent and not waiting:
            return  # the test session is gone (killed without its atexit): end too
        ready, _, _ = select.select([listener], [], [], 0.05)
        if ready:
            conn, _ = listener.accept()
            request, fds = _receive(conn)
            if request is None:  # the client asks the server to end
                return
            pid = os.fork()
            if pid == 0:
                listener.close()
                conn.close()
                for c in waiting.values():
                    c.close()
                _child(request, fds)  # never returns
            for fd in fds:
                os.close(fd)
            conn.sendall(HEADER.pack(pid))
            waiting[pid] = conn
        _reap(waiting)


def _reap(waiting: dict[int, socket.socket]) -> None:
    while waiting:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = waiting.pop(pid, None)
        if conn is None:
            continue
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        try:
            conn.sendall(struct.pack("!i", code))
        except OSError:
            pass
        conn.close()


def _receive(conn: socket.socket) -> tuple[Any, list[int]]:
    fds = array.array("i")
    msg, ancdata, _, _ = conn.recvmsg(HEADER.size, socket.CMSG_LEN(3 * fds.itemsize))
    if not msg:
        return None, []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - (len(data) % fds.itemsize)])
    (size,) = HEADER.unpack(msg)
    body = b""
    while len(body) < size:
        body += conn.recv(size - len(body))
    return pickle.loads(body), list(fds)


def _child(request: dict, fds: list[int]) -> None:
    code = 1
    try:
        if request.get("new_session"):
            os.setsid()
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path[:] = request["sys_path"]
        sys.argv = list(request["argv"]) if request["argv"][0] != "-c" else ["-c", *request["argv"][2:]]
        if request["env"].get("PYTHONUNBUFFERED"):
            for stream in (sys.stdout, sys.stderr):
                stream.reconfigure(line_buffering=True, write_through=True)
        code = _run(request)
    finally:
        _exit_as_python_does(code)


def _run(request: dict) -> int:
    import runpy
    import traceback

    try:
        if request.get("call") is not None:
            fn, args = pickle.loads(request["call"])
            fn(*args)
        elif request["argv"][0] == "-c":
            sys.path.insert(0, "")
            main = type(sys)("__main__")
            sys.modules["__main__"] = main
            exec(compile(request["argv"][1], "<string>", "exec"), main.__dict__)
        else:
            sys.path.insert(0, os.path.dirname(os.path.abspath(request["argv"][0])))
            runpy.run_path(request["argv"][0], run_name="__main__")
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        _flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        return 130
    except BaseException:  # noqa: BLE001 -- as the interpreter: the traceback, status 1
        traceback.print_exc()
        return 1


def _exit_as_python_does(code: int) -> None:
    import atexit
    import threading

    try:
        threading._shutdown()  # non-daemon threads are joined, as at interpreter exit
        atexit._run_exitfuncs()
    finally:
        _flush()
        os._exit(code & 0xFF if code >= 0 else 1)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass


# -- the client ---------------------------------------------------------------------------------

class Zygote:
    """The tests' server: started on first use, ended when the test session ends."""

    def __init__(self) -> None:
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="zygote-")
        self.path = os.path.join(self.dir, "socket")
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self.proc = subprocess.Popen([sys.executable, __file__, self.path], stdout=subprocess.PIPE, env=env,
                                     start_new_session=True)
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"the zygote did not start ({self.proc.poll()})")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


_zygote: Optional[Zygote] = None


def zygote() -> Zygote:
    global _zygote
    if _zygote is None or _zygote.proc.poll() is not None:
        import atexit

        _zygote = Zygote()
        atexit.register(_zygote.close)
    return _zygote


class Forked:
    """A process forked by the zygote, used as a subprocess.Popen(stdout=PIPE, stderr=STDOUT, text=True)."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: str, new_session: bool = True,
                 call: Any = None, stdout: Any = subprocess.PIPE, stderr: Any = subprocess.STDOUT):
        server = zygote()
        self.args, self.returncode = argv, None
        read = write = None
        if stdout is subprocess.PIPE:
            read, write = os.pipe()
            out = write
        elif stdout is None:
            out = 1
        else:
            out = stdout if isinstance(stdout, int) else stdout.fileno()
        err_read = err_write = None
        if stderr is subprocess.PIPE:
            err_read, err_write = os.pipe()
            err = err_write
        else:
            err = out if stderr is subprocess.STDOUT else 2
        stdin = os.open(os.devnull, os.O_RDONLY)
        request = pickle.dumps({"argv": argv, "env": dict(env), "cwd": str(cwd), "new_session": new_session,
                                "sys_path": list(sys.path), "call": None if call is None else pickle.dumps(call)})
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn.connect(server.path)
        self._conn.sendmsg([HEADER.pack(len(request))],
                           [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [stdin, out, err]))])
        self._conn.sendall(request)
        os.close(stdin)
        for fd in (write, err_write):
            if fd is not None:
                os.close(fd)
        self.stdout = os.fdopen(read, "r") if read is not None else None
        self.stderr = os.fdopen(err_read, "r") if err_read is not None else None
        (self.pid,) = HEADER.unpack(self._recv(HEADER.size))

    def _recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self._conn.recv(n - len(data))
            if not chunk:
                raise RuntimeError("the zygote went away")
            data += chunk
        return data

    def poll(self) -> Optional[int]:
        if self.returncode is None and select.select([self._conn], [], [], 0)[0]:
            (self.returncode,) = struct.unpack("!i", self._recv(4))
            self._conn.close()
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if self.returncode is None:
            if not select.select([self._conn], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.poll()
        return self.returncode

    def communicate(self, input: Any = None, timeout: Optional[float] = None) -> tuple[Optional[str], Optional[str]]:
        """As Popen's: all the output (read by threads, so a timeout can be raised and the call
        repeated), then the exit status."""
        import threading

        deadline = None if timeout is None else time.monotonic() + timeout
        if getattr(self, "_readers", None) is None:
            self._texts: dict[str, str] = {}
            self._readers = [threading.Thread(target=lambda n=name, f=f: self._texts.__setitem__(n, f.read()),
                                              daemon=True)
                             for name, f in (("out", self.stdout), ("err", self.stderr)) if f is not None]
            for t in self._readers:
                t.start()
        for t in self._readers:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self._texts.get("out"), self._texts.get("err")

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def run_python(args: list[str], timeout: float, env: Optional[dict] = None, cwd: Optional[str] = None
               ) -> subprocess.CompletedProcess:
    """`subprocess.run([sys.executable, *args], capture_output=True, text=True)` (a script or `-c
    CODE`, then its arguments), forked from the zygote: for tests of behaviour, not of a fresh
    interpreter's start or finalization."""
    proc = Forked(list(args), dict(os.environ if env is None else env), cwd or os.getcwd(), new_session=False,
                  stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return subprocess.CompletedProcess([sys.executable, *args], proc.returncode, out, err)


if __name__ == "__main__":
    serve(sys.argv[1])
