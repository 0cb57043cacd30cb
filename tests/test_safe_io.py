"""lavie_jax.io.safe_io: only what we wrote is ever replaced, protected paths never are, temporaries never outlive
their run (clean-up on errors and signals, stale ones of dead processes removed), and checks create nothing."""

import json
import os
import signal
import subprocess
import sys

import pytest

from lavie_jax.io import safe_io
from lavie_jax.io.interrupts import Terminated, terminate_as_interrupt
from lavie_jax.io.safe_io import (FileOwnership, Ownership, OutputPathError, atomic_directory, atomic_file,
                               check_input, check_location, check_output_directory, check_output_file, clean_stale,
                               protected_reason)

# A stand-in for a caller's kind of directory (checkpoints, training work directories): a pipeline-like "bundle"
# whose "part" entry is itself one of ours, and whose "notes" content is not inspected.
OWNER = Ownership(what="test directory", writer="test-tool", marker="owner.json", fields={"format": "test"},
                  layouts={"leaf": {"data": None}, "bundle": {"part": ("leaf",), "notes": None}})
FILES = FileOwnership(what="a test file", writer="test-tool",
                      recognise=lambda p: None if p.read_bytes().startswith(b"OURS") else "it does not start OURS")


def ours(path, kind="leaf"):
    """A directory OWNER recognises: its marker and the entries of its kind."""
    path.mkdir(parents=True)
    OWNER.write_marker(path, kind)
    if kind == "leaf":
        (path / "data").write_text("x")
    else:
        ours(path / "part")
        (path / "notes").mkdir()
    return path


def hidden(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_ownership(tmp_path):
    assert OWNER.why_not(ours(tmp_path / "leaf")) is None
    assert OWNER.why_not(ours(tmp_path / "bundle", "bundle")) is None
    (tmp_path / "bundle" / "notes" / "anything").write_text("inside an uninspected entry")
    (tmp_path / "bundle" / ".DS_Store").write_text("")
    assert OWNER.why_not(tmp_path / "bundle") is None
    (tmp_path / "leaf" / "mine.txt").write_text("user data")
    (tmp_path / "leaf" / "more").mkdir()
    assert OWNER.why_not(tmp_path / "leaf") == "it holds mine.txt, more/, which test-tool did not write"
    (tmp_path / "bundle" / "part" / "data").unlink()
    (tmp_path / "bundle" / "part" / "data").symlink_to(tmp_path / "leaf" / "mine.txt")  # links are not ours
    assert OWNER.why_not(tmp_path / "bundle") == "part/ is not ours: it holds data, which test-tool did not write"
    plain = tmp_path / "plain"
    plain.mkdir()
    assert OWNER.why_not(plain) == "it has no owner.json"
    (plain / "owner.json").write_text("{not json")
    assert "cannot be read as JSON" in OWNER.why_not(plain)
    (plain / "owner.json").write_text(json.dumps({"format": "other", "kind": "leaf"}))
    assert OWNER.why_not(plain) == "its owner.json was not written by test-tool (format is 'other')"
    (plain / "owner.json").write_text(json.dumps({"format": "test", "kind": "part"}))
    assert "has kind 'part'" in OWNER.why_not(plain)
    assert OWNER.why_not(tmp_path / "leaf" / "mine.txt") == "it is a file"
    with pytest.raises(ValueError, match="unknown test directory kind"):
        OWNER.write_marker(plain, "nope")


def test_protected_paths(tmp_path, monkeypatch):
    home = tmp_path / "home"
    work = home / "projects" / "run"
    work.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert protected_reason("/") == "it is the root directory"
    assert protected_reason(home) == "it is your home directory"
    assert protected_reason(tmp_path) == "your home directory is inside it"
    assert protected_reason(".") == protected_reason("") == "it is the current directory"
    assert protected_reason("..") == protected_reason(home / "projects") == "the current directory is inside it"
    assert protected_reason("out") is None and protected_reason(work / "sub" / "..") == "it is the current directory"
    (work / "link").symlink_to(home / "projects")  # a link's target is not what the name says: the name counts
    assert protected_reason("link") is None
    # none of them is replaced, even when it looks like ours and overwrite is given
    OWNER.write_marker(work, "leaf")
    for path in (".", "..", home, "/"):
        with pytest.raises(OutputPathError, match="test-tool never replaces it, even with --overwrite"):
            check_output_directory(path, OWNER, overwrite=True)


def test_check_output_directory(tmp_path):
    out = tmp_path / "out"
    assert check_output_directory(out, OWNER) is False and not out.exists()  # checking creates nothing
    ours(out)
    with pytest.raises(OutputPathError, match=r"out already exists; pass --overwrite to replace it"):
        check_output_directory(out, OWNER)
    assert check_output_directory(out, OWNER, overwrite=True) is True
    (out / "mine.txt").write_text("user data")
    with pytest.raises(OutputPathError, match=r"--output .*out: it already exists and is not a test directory \(it "
                                              r"holds mine.txt, which test-tool did not write\); test-tool never "
                                              r"replaces it, even with --overwrite: choose another --output, or move"):
        check_output_directory(out, OWNER, overwrite=True)
    (tmp_path / "link").symlink_to(out)
    with pytest.raises(OutputPathError, match="link: it is a symbolic link; test-tool never replaces it"):
        check_output_directory(tmp_path / "link", OWNER, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="file: it is a file, not a test directory; test-tool never replaces"):
        check_output_directory(tmp_path / "file", OWNER, overwrite=True)
    with pytest.raises(OutputPathError, match=r"--ckpt .*file/sub/out: .*file is a file, not a directory; choose "
                                              r"another --ckpt"):
        check_output_directory(tmp_path / "file" / "sub" / "out", OWNER, flag="--ckpt")
    (tmp_path / "empty").mkdir()  # nothing in it to lose: replaceable, but still only when asked
    with pytest.raises(OutputPathError, match="already exists; pass --overwrite"):
        check_output_directory(tmp_path / "empty", OWNER)
    assert check_output_directory(tmp_path / "empty", OWNER, overwrite=True) is True


def test_unwritable_location(tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: real_access(p, mode) and not str(p).endswith("ro"))
    (tmp_path / "ro").mkdir()
    with pytest.raises(OutputPathError, match=r"--output .*ro/a/b: cannot write into .*ro \(permission denied\); "
                                              r"choose a writable location for --output"):
        check_location(tmp_path / "ro" / "a" / "b")
    (tmp_path / "broken").symlink_to(tmp_path / "missing")
    with pytest.raises(OutputPathError, match="broken is a broken symbolic link"):
        check_location(tmp_path / "broken" / "x")


def test_check_input(tmp_path):
    with pytest.raises(OutputPathError, match=r"--checkpoint .*nope\.pt: no such file"):
        check_input(tmp_path / "nope.pt", flag="--checkpoint")
    with pytest.raises(OutputPathError, match=r"--checkpoint .* is a directory, not a file"):
        check_input(tmp_path, flag="--checkpoint")
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputPathError, match=r"--model-dir .*f is a file, not a directory"):
        check_input(tmp_path / "f", flag="--model-dir", directory=True)
    assert check_input(tmp_path / "f", flag="--checkpoint") == tmp_path / "f"


def test_atomic_directory(tmp_path):
    out = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(out, OWNER) as tmp:
            OWNER.write_marker(tmp, "leaf")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # neither the temporary nor the parents it created
    with atomic_directory(out, OWNER) as tmp:
        OWNER.write_marker(tmp, "leaf", version=1)
        (tmp / "data").write_text("1")
    with pytest.raises(OutputPathError, match="already exists; pass --overwrite"):
        with atomic_directory(out, OWNER):
            pass
    with atomic_directory(out, OWNER, overwrite=True) as tmp:
        OWNER.write_marker(tmp, "leaf", version=2)
    assert sorted(p.name for p in out.iterdir()) == ["owner.json"] and hidden(out.parent) == []
    assert json.loads((out / "owner.json").read_text())["version"] == 2
    # what it writes must be recognisable later, or it is not put in place
    with pytest.raises(RuntimeError, match="would not be recognised later"):
        with atomic_directory(tmp_path / "unmarked", OWNER) as tmp:
            (tmp / "data").write_text("no marker")
    assert not (tmp_path / "unmarked").exists() and hidden(tmp_path) == []


def test_atomic_directory_rechecks_before_replacing(tmp_path):
    out = ours(tmp_path / "out")
    with pytest.raises(OutputPathError, match="holds mine.txt"):
        with atomic_directory(out, OWNER, overwrite=True) as tmp:
            OWNER.write_marker(tmp, "leaf")
            (out / "mine.txt").write_text("saved there while the write ran")
    assert (out / "mine.txt").read_text() == "saved there while the write ran" and hidden(tmp_path) == []


def test_atomic_file(tmp_path):
    path = tmp_path / "sub" / "w.bin"
    with pytest.raises(RuntimeError, match="would not be recognised"):
        with atomic_file(path, FILES) as tmp:
            tmp.write_bytes(b"theirs")
    assert list(tmp_path.iterdir()) == []
    with atomic_file(path, FILES) as tmp:
        tmp.write_bytes(b"OURS 1")
    with atomic_file(path, FILES, overwrite=True) as tmp:
        tmp.write_bytes(b"OURS 2")
    assert path.read_bytes() == b"OURS 2" and hidden(path.parent) == []
    path.write_bytes(b"a user's file")
    with pytest.raises(OutputPathError, match=r"it already exists and is not a test file \(it does not start OURS\)"):
        check_output_file(path, FILES, overwrite=True)
    (tmp_path / "dir.bin").mkdir()
    with pytest.raises(OutputPathError, match=r"dir.bin: it already exists and is not a test file \(it is a directory"):
        check_output_file(tmp_path / "dir.bin", FILES, overwrite=True)


def test_clean_stale(tmp_path):
    out = tmp_path / "out"
    gone, host = dead_pid(), safe_io._host()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        def partial(name, pid, role="tmp", marker_host=host):
            d = tmp_path / name
            d.mkdir()
            (d / "half").write_text("x")
            (d / safe_io.PARTIAL_MARKER).write_text(json.dumps({"pid": pid, "host": marker_host, "role": role,
                                                                  "output": "out"}))
            return d

        dead_tmp = partial(".out.tmp-a", gone)
        live_tmp = partial(".out.tmp-b", live.pid)
        other_host = partial(".out.tmp-c", gone, marker_host="elsewhere")
        (tmp_path / ".out.tmp-d").mkdir()  # no marker: not made by us
        other_output = tmp_path / ".outer.tmp-e"
        other_output.mkdir()
        old = partial(".out.old-f", gone, role="old")  # died between its renames: the old output is kept in it
        ours(old / "out")
        stale_file = tmp_path / f".out.tmp-{gone}@{host}"
        stale_file.write_bytes(b"half")
        assert sorted(clean_stale(out)) == sorted([dead_tmp, old, stale_file])
        assert json.loads((out / "owner.json").read_text())["kind"] == "leaf"  # put back, whole
        assert hidden(tmp_path) == sorted(p.name for p in (live_tmp, other_host, tmp_path / ".out.tmp-d",
                                                            other_output))
        # an old output whose replacement did arrive is just removed
        old = partial(".out.old-g", gone, role="old")
        ours(old / "out")
        assert clean_stale(out) == [old] and not old.exists()
    finally:
        live.kill()
        live.wait()


def test_sigterm_becomes_an_interrupt_and_the_swap_is_never_split(tmp_path, monkeypatch):
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        with terminate_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes, right away
                pass
    assert signal.getsignal(signal.SIGTERM) is previous
    out = ours(tmp_path / "out")
    real_rename = os.rename

    def rename_then_signal(a, b):
        real_rename(a, b)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives between the two renames of the swap

    with pytest.raises(Terminated):
        with terminate_as_interrupt():
            with atomic_directory(out, OWNER, overwrite=True) as tmp:
                OWNER.write_marker(tmp, "leaf", version=2)
                monkeypatch.setattr(os, "rename", rename_then_signal)
    monkeypatch.undo()
    # the signal waited for the swap: the new output is whole, the old one gone, no temporaries left
    assert json.loads((out / "owner.json").read_text())["version"] == 2 and hidden(tmp_path) == []


# A write killed with SIGKILL mid-way (no clean-up can run): the temporary stays, marked with the dead process.
KILLED_WRITE = """
import sys, time
from lavie_jax.io.safe_io import Ownership, atomic_directory
owner = Ownership(what="t", writer="t", marker="owner.json", fields={}, layouts={"leaf": {"data": None}})
with atomic_directory(sys.argv[1], owner, overwrite=True) as tmp:
    (tmp / "data").write_text("half")
    print("writing", flush=True)
    time.sleep(60)
"""


def test_leftovers_of_a_killed_write_are_cleared_by_the_next(tmp_path):
    out = ours(tmp_path / "out")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITE, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "writing\n"
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    [left] = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert json.loads((left / safe_io.PARTIAL_MARKER).read_text())["pid"] == proc.pid
    with atomic_directory(out, OWNER, overwrite=True) as tmp:  # the next write to the same output
        OWNER.write_marker(tmp, "leaf", version=2)
    assert hidden(tmp_path) == [] and json.loads((out / "owner.json").read_text())["version"] == 2
