"""jaxft.eval.sandbox: the programs a code benchmark runs end as failed samples, within their
timeout, whatever they do (loop, fork, allocate, write outside, shell out, connect), while the
others in the same batch are judged as usual.

The fork-bomb test runs only after a probe showed, in the sandbox, that a single fork (whose
child exits at once) is refused: the machine is shared, and as root RLIMIT_NPROC does nothing.
"""

import socket
import subprocess
import sys
import textwrap
import time

import pytest

from jaxft.eval import sandbox
from jaxft.eval.sandbox import Limits, run_program, run_programs

FAST = Limits(timeout_s=3.0)


def test_passing_program_passes_and_failing_assert_fails_with_its_message():
    ok, bad, exits, crash = run_programs([
        "def add(a, b):\n    return a + b\nassert add(2, 3) == 5\n",
        "def add(a, b):\n    return a - b\nassert add(2, 3) == 5, 'add(2, 3) should be 5'\n",
        "import sys\nsys.exit(0)\nassert False\n",  # exiting before the tests ran is not passing
        "import faulthandler\nfaulthandler._sigsegv()\n",
    ], FAST)
    assert ok.passed and ok.status == "passed" and ok.error is None
    assert not bad.passed and bad.status == "failed"
    assert bad.error == "AssertionError: add(2, 3) should be 5"
    assert exits.status == "failed" and "SystemExit" in exits.error
    assert crash.status == "error" and crash.error.startswith("killed by SIGSEGV"), crash


def test_each_program_gets_a_fresh_working_directory():
    write = "import os\nopen('state.txt', 'w').write('x')\nassert os.listdir('.') == ['state.txt']\n"
    first, second = run_programs([write, write], FAST, workers=1)
    assert first.passed and second.passed, (first, second)


def test_hostile_programs_end_as_failed_samples_and_the_batch_goes_on(tmp_path):
    outside = tmp_path / "outside.txt"
    marker = tmp_path / "marker"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub" / "keep.txt").write_text("keep")
    programs = {
        "infinite loop": "while True:\n    pass\n",
        "10 GB allocation": "x = bytearray(10 * 1024**3)\nassert x\n",
        "write outside": f"open({str(outside)!r}, 'w').write('escaped')\n",
        "pathlib write outside": f"import pathlib\npathlib.Path({str(outside)!r}).write_text('escaped')\n",
        "rmtree outside": f"import shutil\nshutil.rmtree({str(victim)!r})\n",
        "rmtree inside": "import os, shutil\nos.makedirs('a/b')\nshutil.rmtree('a')\nassert not os.path.exists('a')\n",
        "os.system": f"import os\nos.system('touch {marker}')\n",
        "subprocess": f"import subprocess\nsubprocess.run(['touch', {str(marker)!r}])\n",
        "network": f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'x')\n",
        "good": "assert sorted([3, 1, 2]) == [1, 2, 3]\n",
    }
    start = time.monotonic()
    results = dict(zip(programs, run_programs(list(programs.values()), FAST)))
    elapsed = time.monotonic() - start
    for name, result in results.items():
        print(f"{name:22s} {result.status:8s} {result.seconds:5.2f} s  {result.error}")
    assert results.pop("good").passed and results.pop("rmtree inside").passed
    assert not any(r.passed for r in results.values())
    assert all(r.seconds < FAST.timeout_s + 1.5 for r in results.values())
    assert elapsed < 2 * FAST.timeout_s + 5  # two workers, one loop: the rest never waits on it
    assert results["infinite loop"].status == "timeout"
    assert results["10 GB allocation"].error == "MemoryError"
    assert not outside.exists() and not marker.exists()
    assert (victim / "sub" / "keep.txt").read_text() == "keep"
    with pytest.raises(socket.timeout):
        listener.accept()  # nothing ever connected
    listener.close()


def test_the_kernel_filter_alone_refuses_fork_exec_sockets_and_signals():
    """Without the Python guards (which a program could undo), seccomp still refuses: the check
    that the sandbox holds as root, where RLIMIT_NPROC does not apply."""
    if not sandbox.enforcement()["seccomp"]:
        pytest.skip("no seccomp filter on this platform")
    probe = textwrap.dedent(f"""
        import os, socket, subprocess, sys, threading
        sys.path.insert(0, {str(sandbox.__file__.rsplit('/', 1)[0])!r})
        import sandbox
        assert sandbox._install_seccomp()
        refused = []
        try:
            pid = os.fork()
            if pid == 0:
                os._exit(0)  # had it forked, the child leaves at once
            os.waitpid(pid, 0)
        except PermissionError:
            refused.append("fork")
        try:
            subprocess.run(["true"])
        except PermissionError:
            refused.append("exec")
        try:
            socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except PermissionError:
            refused.append("inet socket")
        try:
            os.kill(os.getppid(), 0)  # signal 0: only asks whether the parent exists
        except PermissionError:
            refused.append("kill")
        os.kill(os.getpid(), 0)  # signals to itself are allowed (abort(), raise())
        t = threading.Thread(target=lambda: None)
        t.start(); t.join()  # threads are allowed
        print(",".join(refused))
    """)
    out = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "fork,exec,inet socket,kill"


def test_fork_bomb_ends_as_a_failed_sample():
    probe = run_program("import os\npid = os.fork()\nif pid == 0:\n    raise SystemExit\n", FAST)
    assert probe.status == "failed" and "fork" in probe.error, probe
    enforced = sandbox.enforcement()
    if not (enforced["seccomp"] or enforced["nproc_limit"]):
        pytest.skip("fork is refused only by the Python guards here; not running a fork bomb on them alone")
    bombs = [
        "import os\nwhile True:\n    os.fork()\n",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n        pass\n",
        "import multiprocessing\nwhile True:\n    multiprocessing.Process(target=print).start()\n",
    ]
    results = run_programs(bombs, FAST)
    print(results)
    assert [r.status for r in results] == ["failed", "timeout", "failed"]


def test_the_network_namespace_alone_cannot_reach_a_local_listener():
    """The second network layer, without seccomp: a fresh namespace has no way to the host's
    loopback, so a listener there is never reached."""
    prefix = sandbox._netns_prefix()
    if not prefix:
        pytest.skip("unshare --net does not work here")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    connect = f"import socket\nsocket.create_connection(('127.0.0.1', {listener.getsockname()[1]}), timeout=2)"
    out = subprocess.run([*prefix, sys.executable, "-I", "-c", connect], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "Error" in out.stderr.splitlines()[-1], out.stderr  # here: Network is unreachable
    with pytest.raises(socket.timeout):
        listener.accept()
    listener.close()
