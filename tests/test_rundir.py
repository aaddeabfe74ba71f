"""engine.rundir: the run directory's files (atomic writes, checkpoints, the event log)."""

from __future__ import annotations

import json

from engine.app import session as run_module
from engine.app import config as run_config
from engine.rundir import CheckpointError, checkpoint_files, newest_checkpoint, read_events, \
    write_atomic, write_checkpoint

GOOD = '{"event": "session", "time": 1.0}\n{"event": "generation", "time": 2.0}\n'


def test_a_line_cut_short_by_a_kill_is_expected_and_a_garbled_one_is_not(tmp_path):
    log = tmp_path / "events.jsonl"
    assert read_events(log).events == [] and not read_events(log).damaged  # no log yet
    log.write_text(GOOD + '{"event": "evalu')
    cut = read_events(log)
    assert [e["event"] for e in cut.events] == ["session", "generation"]
    assert cut.bad == [3] and not cut.damaged
    log.write_bytes(b'[1, 2]\n\xff\xfe\n' + GOOD.encode())
    garbled = read_events(log)
    assert len(garbled.events) == 2 and garbled.bad == [1, 2] and garbled.damaged


def test_a_session_reads_a_log_with_garbled_bytes_and_non_events(tmp_path):
    """The run's own reader is the one engine.show uses: a garbled byte made it raise
    UnicodeDecodeError, and a JSON line that is no event reached the report's counts."""
    out = tmp_path / "run"
    args = run_config.build_parser().parse_args(["--preset", "smoke", "--out", str(out),
                                                 "--store", str(tmp_path / "s.sqlite")])
    session = run_module.Session(out, run_config.new_config(args, []), resumed=False)
    out.mkdir()
    (out / "events.jsonl").write_bytes(b'\xff garbled\n[1, 2]\n' + GOOD.encode()
                                       + b'{"event": "evalu')
    assert [e["event"] for e in session.events()] == ["session", "generation"]


def test_the_newest_checkpoint_that_loads_and_why_newer_ones_were_refused(tmp_path):
    for generation in range(4):
        write_checkpoint(tmp_path, generation, {"generation": generation})
    assert [p.name for p in checkpoint_files(tmp_path)] == ["gen-000003.json", "gen-000002.json"]
    newest = tmp_path / "gen-000003.json"
    newest.write_text(newest.read_text()[:40])  # cut short
    scan = newest_checkpoint(tmp_path)
    assert scan.path == tmp_path / "gen-000002.json" and scan.body["generation"] == 2
    assert len(scan.refused) == 1 and isinstance(scan.refused[0], CheckpointError)
    assert "gen-000003.json: not a complete JSON checkpoint" in str(scan.refused[0])
    (tmp_path / "gen-000002.json").write_text("{}")
    scan = newest_checkpoint(tmp_path)
    assert scan.body is None and scan.path is None and len(scan.refused) == 2


def test_an_atomic_write_replaces_the_file_and_leaves_no_temporary_behind(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    write_atomic(path, json.dumps({"a": 1}), durable=True)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
