"""`deltaxfer report`: a migration report read back, summarized and drawn."""
import json

from deltaxfer.cli import main

REPORT = {
    "pid": 42, "to": "10.0.0.2:7411", "session": "s", "outcome": "migrated", "error": None,
    "rounds": [
        {"round": 1, "live": True, "pages": 1000, "changed": 1000, "wire_bytes": 3_000_000,
         "seconds": 0.5, "predicted_downtime": 0.4},
        {"round": 2, "live": True, "pages": 1000, "changed": 40, "wire_bytes": 20_000,
         "seconds": 0.1, "predicted_downtime": 0.2},
        {"round": 3, "live": False, "pages": 1001, "changed": 12, "wire_bytes": 6_000,
         "seconds": 0.05},
    ],
    "stop_reason": "converged", "predicted_downtime": 0.2, "downtime": 0.25,
    "freeze": {"dump": 0.05, "read_memory": 0.1, "residual": 0.05, "files": 0.01,
               "commit_restore": 0.04, "criu_exit": 0},
    "total_seconds": 1.2, "cpu_seconds": 0.8, "wire_bytes_sent": 3_026_000,
    "destination_path": "/srv/s/images", "restored_pid": 77,
}


def test_summary_and_plot(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(REPORT))
    png = tmp_path / "r.png"
    assert main(["report", str(path), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "migrated" in out and "downtime 250 ms (predicted 200 ms)" in out
    assert "read_memory 100 ms" in out and "pid 77" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_bad_report_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{\"not\": \"a report\"}")
    assert main(["report", str(bad)]) == 2
    assert "not a deltaxfer migration report" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing.json")]) == 2
    assert "No such file" in capsys.readouterr().err
