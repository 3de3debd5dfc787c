"""Every kind of broken dump gives one line naming the file and the cause, exit 2 —
never a traceback, never a hang."""
import os
import struct

import pytest

from deltaxfer.cli import main
from deltaxfer.criu import images as im
from test_criu_images import write_dump


def corrupt(d, name, how):
    p = d / name
    data = p.read_bytes()
    if how == "truncate":
        p.write_bytes(data[:len(data) - 3])
    elif how == "magic":
        p.write_bytes(b"JUNK" + data[4:])
    elif how == "huge-entry":
        p.write_bytes(data[:8] + struct.pack("<I", 0x7FFFFFFF) + data[12:])
    elif how == "empty":
        p.write_bytes(b"")
    elif how == "remove":
        p.unlink()


@pytest.mark.parametrize("name", ["pstree.img", "core-1.img", "pagemap-1.img", "mm-1.img"])
@pytest.mark.parametrize("how", ["truncate", "magic", "huge-entry", "empty", "remove"])
@pytest.mark.parametrize("command", ["inspect", "diff", "rewrite"])
def test_broken_dump(tmp_path, capsys, name, how, command):
    d = tmp_path / "dump"
    write_dump(d, [(0x10000, 2, im.PE_PRESENT), (0x20000, 1, im.PE_PRESENT)])
    (d / "mm-1.img").write_bytes(im.encode_image(im.MM_MAGIC, [b""]))
    corrupt(d, name, how)
    argv = {"inspect": ["inspect", str(d)],
            "diff": ["diff", str(d), str(d)],
            "rewrite": ["rewrite", str(d), str(tmp_path / "out")]}[command]
    rc = main(argv)
    err = capsys.readouterr().err
    if (command, name) in (("rewrite", "core-1.img"), ("rewrite", "mm-1.img"),
                           ("diff", "mm-1.img")):
        # rewrite copies non-memory images verbatim and diff needs no VMAs: neither has
        # any business parsing these (criu restore will judge them)
        assert rc == 0
        return
    assert rc == 2, err
    assert err.startswith(f"deltaxfer {command}: error: ") and name in err, err
    assert "Traceback" not in err and err.count("\n") == 1


def test_rewrite_refuses_existing_destination(tmp_path, capsys):
    write_dump(tmp_path / "dump", [(0x10000, 1, im.PE_PRESENT)])
    os.mkdir(tmp_path / "out")
    assert main(["rewrite", str(tmp_path / "dump"), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
