"""Dead letters and spool commands, run as real processes against a live sidecar's spool."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import sqlite3
from typing import Any

import orjson
import pytest

from sidecar.server import Server, StartupError
from tests.conftest import EXAMPLE_EVENT, ROOT, Sidecar, StartSidecar, sidecar_command
from tests.fake_precogx import FakePrecogX, Hold

BATCH = "/api/v1/telemetry/batch"


async def cli(sidecar: Sidecar, *args: str) -> tuple[int, str, str]:
    """Run the CLI without blocking the loop: the sidecar keeps serving meanwhile."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRECOGX_")}
    env["PYTHONPATH"] = str(ROOT)
    config_path = os.path.join(os.path.dirname(sidecar.config.spool.path), "sidecar.toml")
    proc = await asyncio.create_subprocess_exec(
        *sidecar_command(*args, "--config", config_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def send(sidecar: Sidecar, agents: list[str]) -> list[int]:
    items = []
    for i, agent in enumerate(agents):
        e = copy.deepcopy(EXAMPLE_EVENT)
        e.update(agentId=agent, prompt=f"prompt {i}")
        items.append(e)
    status, body = await sidecar.post(BATCH, {"interactions": items})
    assert status == 202
    ids: list[int] = body["ids"]
    return ids


async def with_dead_letters(
    start_sidecar: StartSidecar, fake: FakePrecogX, **overrides: Any
) -> tuple[Sidecar, list[int], list[int]]:
    """A sidecar whose spool holds two rejected dead letters and delivered the rest."""
    fake.reject_agent_ids = {"bad"}
    upstream = {"batch_max_events": 10, "linger_ms": 100, **overrides.pop("upstream", {})}
    sidecar = await start_sidecar(upstream=upstream, **overrides)
    ids = await send(sidecar, ["good", "bad", "good", "bad", "good"])
    spool = sidecar.server.spool
    await spool.wait_until(lambda: spool.counts.pending == 0)
    return sidecar, [ids[1], ids[3]], [ids[0], ids[2], ids[4]]


async def test_list_json_shows_reason_status_error_and_event(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    sidecar, dead, _ = await with_dead_letters(start_sidecar, fake)
    code, out, _ = await cli(sidecar, "dead-letters", "list", "--json")
    assert code == 0
    records = orjson.loads(out)
    assert [r["id"] for r in records] == dead
    first = records[0]
    assert (first["reason"], first["status"], first["attempts"]) == ("rejected", 400, 1)
    assert "INVALID_FIELD_TYPE" in first["error"]
    assert first["event"]["agentId"] == "bad"
    assert first["dead_at"].endswith("Z")


async def test_list_filters_and_text_output(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    sidecar, dead, _ = await with_dead_letters(start_sidecar, fake)
    code, out, _ = await cli(sidecar, "dead-letters", "list", "--reason", "too_large", "--json")
    assert (code, orjson.loads(out)) == (0, [])
    code, out, _ = await cli(sidecar, "dead-letters", "list", "--since", "1h", "--json")
    assert len(orjson.loads(out)) == 2
    code, out, _ = await cli(sidecar, "dead-letters", "list", "--since", "2999-01-01", "--json")
    assert orjson.loads(out) == []
    code, out, err = await cli(sidecar, "dead-letters", "list")
    assert code == 0
    assert str(dead[0]) in out and "rejected" in out
    assert "2 dead letters" in err


async def test_show_one_and_unknown_id(start_sidecar: StartSidecar, fake: FakePrecogX) -> None:
    sidecar, dead, delivered = await with_dead_letters(start_sidecar, fake)
    code, out, _ = await cli(sidecar, "dead-letters", "show", str(dead[1]))
    assert code == 0 and orjson.loads(out)["id"] == dead[1]
    code, out, err = await cli(sidecar, "dead-letters", "show", str(delivered[0]))
    assert code == 1 and out == ""
    assert f"no dead letter with id {delivered[0]}" in err


async def test_replay_sends_again_through_the_running_sidecar(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    sidecar, dead, _ = await with_dead_letters(start_sidecar, fake)
    fake.reject_agent_ids = set()
    code, out, err = await cli(sidecar, "dead-letters", "replay", "--id", str(dead[0]))
    assert code == 0, err
    assert out.startswith("1 dead letters back to pending")
    await fake.wait_for_received(4)
    assert fake.received[-1]["agentId"] == "bad"
    spool = sidecar.server.spool
    await spool.wait_until(lambda: spool.counts.dead == 1 and spool.counts.pending == 0)
    code, out, _ = await cli(sidecar, "dead-letters", "replay", "--reason", "rejected")
    assert code == 0
    await fake.wait_for_received(5)
    await spool.wait_until(lambda: spool.counts.dead == 0 and spool.counts.pending == 0)


async def test_replayed_expired_dead_letters_are_sent_not_expired_again(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    """They kept their age: the sidecar made them dead letters `expired` again at once,
    without sending them, though the CLI said they would be sent."""
    fake.default = Hold(asyncio.Event())  # never answers: the events age in the spool
    sidecar = await start_sidecar(retry={"max_age_s": 1.0}, upstream={"timeout_s": 0.2})
    ids = await send(sidecar, ["a", "a"])
    spool = sidecar.server.spool
    await spool.wait_until(lambda: spool.counts.dead == 2)
    fake.default = None
    code, out, err = await cli(sidecar, "dead-letters", "replay", "--reason", "expired")
    assert code == 0 and out.startswith("2 dead letters back to pending"), err
    await fake.wait_for_received(2)
    assert sorted(int(r["metadata"]["sidecar_event_id"].rsplit("-", 1)[1])
                  for r in fake.received) == ids
    await spool.wait_until(lambda: spool.counts.dead == 0 and spool.counts.pending == 0)


async def test_replayed_dead_letters_older_than_max_age_are_sent(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    """A dead letter waiting longer than retry.max_age_s for its fix (a week, by default)
    was made a dead letter `expired` at once when replayed, without being sent."""
    sidecar, _, _ = await with_dead_letters(start_sidecar, fake)
    with sqlite3.connect(sidecar.config.spool.path) as db:  # received a month ago
        db.execute("UPDATE events SET received_at = received_at - 30 * 86400")
    fake.reject_agent_ids = set()
    code, out, err = await cli(sidecar, "dead-letters", "replay", "--reason", "rejected")
    assert code == 0 and out.startswith("2 dead letters back to pending"), err
    await fake.wait_for_received(5)
    spool = sidecar.server.spool
    await spool.wait_until(lambda: spool.counts.dead == 0 and spool.counts.pending == 0)


async def test_replay_and_purge_need_a_selection(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    sidecar, _, _ = await with_dead_letters(start_sidecar, fake)
    for action in ("replay", "purge"):
        code, _, err = await cli(sidecar, "dead-letters", action)
        assert code == 1
        assert "--all" in err


async def test_purge_asks_for_yes_then_deletes(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    sidecar, _, _ = await with_dead_letters(start_sidecar, fake)
    code, _, err = await cli(sidecar, "dead-letters", "purge", "--all")
    assert code == 1 and "would delete 2 dead letters" in err
    code, out, err = await cli(sidecar, "dead-letters", "purge", "--all", "--yes")
    assert code == 0 and out.startswith("2 dead letters purged")
    assert "purged 2/2" in err
    with sqlite3.connect(sidecar.config.spool.path) as db:
        assert db.execute("SELECT count(*) FROM events").fetchone() == (0,)
    spool = sidecar.server.spool
    await spool.wait_until(lambda: spool.counts.dead == 0)


async def test_spool_stats_and_check(start_sidecar: StartSidecar, fake: FakePrecogX) -> None:
    sidecar, _, _ = await with_dead_letters(start_sidecar, fake)
    code, out, _ = await cli(sidecar, "spool", "stats", "--json")
    stats = orjson.loads(out)
    assert code == 0
    assert stats["events"] == {"pending": 0, "dead": 2}
    assert stats["dead_by_reason"] == {"rejected": 2}
    assert stats["bytes"] > 0
    code, out, _ = await cli(sidecar, "spool", "stats")
    assert "dead         2" in out
    assert "dead/rejected 2" in out  # reasons longer than the column still get a space
    code, out, _ = await cli(sidecar, "spool", "check")
    assert (code, out.strip()) == (0, "ok")
    assert stats["file_bytes"] > stats["bytes"]  # the payloads and SQLite's pages
    assert stats["gives_back_space"] is True
    assert stats["free_bytes"] >= 0


async def test_spool_compact_waits_for_the_sidecar_to_stop(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    sidecar, _, _ = await with_dead_letters(start_sidecar, fake)
    code, _, err = await cli(sidecar, "spool", "compact")
    assert code == 1 and "a sidecar is running on" in err and "stop it first" in err
    await sidecar.stop()
    code, out, err = await cli(sidecar, "spool", "compact")
    assert code == 0, err
    assert "bytes on disk before" in out and "compacting" in err
    code, out, _ = await cli(sidecar, "dead-letters", "list", "--json")
    assert len(orjson.loads(out)) == 2  # nothing lost on the way


async def check_after(sidecar: Sidecar, *edits: tuple[str, tuple[Any, ...]]) -> tuple[int, str]:
    """`spool check` of the stopped sidecar's spool, after the edits made by hand."""
    await sidecar.stop()
    with sqlite3.connect(sidecar.config.spool.path) as db:
        for sql, params in edits:
            db.execute(sql, params)
    code, out, _ = await cli(sidecar, "spool", "check")
    return code, out


async def test_spool_check_reports_broken_invariants(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    sidecar, dead, _ = await with_dead_letters(start_sidecar, fake)
    code, out = await check_after(
        sidecar,
        ("UPDATE events SET dead_reason = NULL WHERE id = ?", (dead[0],)),
        ("UPDATE events SET payload = '[1]', size = 3 WHERE id = ?", (dead[1],)),
    )
    assert code == 1
    assert f"dead letters without a reason or time: {dead[0]}" in out
    assert f"payloads that are not JSON objects: {dead[1]}" in out


async def test_a_spool_whose_next_id_is_no_number_is_reported_not_a_traceback(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    """`spool check` said ok, and the next start died with a ValueError traceback."""
    sidecar, _, _ = await with_dead_letters(start_sidecar, fake)
    code, out = await check_after(sidecar, ("UPDATE meta SET value = 'x' WHERE key = ?",
                                            ("next_id",)))
    assert code == 1 and "meta next_id is not a number" in out
    with pytest.raises(StartupError, match="next_id is not a number") as info:
        await Server(sidecar.config).startup()
    assert "\n" not in str(info.value)


async def test_dead_letter_cap_prunes_oldest_and_counts(
    start_sidecar: StartSidecar, fake: FakePrecogX, caplog: pytest.LogCaptureFixture
) -> None:
    """And logs the first pruning, then a line a minute: with a steady trickle of rejected
    events a soak logged a line per event."""
    caplog.set_level(logging.INFO, "sidecar")
    fake.reject_agent_ids = {"bad"}
    sidecar = await start_sidecar(spool={"max_dead_events": 2}, upstream={"linger_ms": 0})
    ids = []
    spool = sidecar.server.spool
    for _ in range(5):
        ids += await send(sidecar, ["bad"])
        await spool.wait_until(lambda: spool.counts.pending == 0 and not spool.inflight)
    with sqlite3.connect(sidecar.config.spool.path) as db:
        kept = [r[0] for r in db.execute("SELECT id FROM events WHERE state = 'dead'")]
    assert kept == ids[3:]
    _, metrics = await sidecar.get("/metrics")
    assert 'precogx_sidecar_events_dropped_total{reason="dead_letter_pruned"} 3.0' in metrics
    pruned = [r.getMessage() for r in caplog.records if "max_dead_events" in r.getMessage()]
    assert pruned == ["dead letters over spool.max_dead_events: pruned the 1 oldest"]
    await sidecar.stop()
    pruned = [r.getMessage() for r in caplog.records if "max_dead_events" in r.getMessage()]
    assert len(pruned) == 2 and pruned[1].startswith(
        "dead letters over spool.max_dead_events: 2 more prunings (2 events) in the last "
        "minute"
    )


async def test_bad_time_and_missing_spool_are_clear_errors(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    sidecar = await start_sidecar()
    code, _, err = await cli(sidecar, "dead-letters", "list", "--since", "yesterday")
    assert code == 2 and "neither an ISO time" in err
    await sidecar.stop()
    os.remove(sidecar.config.spool.path)
    code, _, err = await cli(sidecar, "spool", "stats")
    assert code == 1 and "does not exist" in err and "Traceback" not in err


async def test_replay_while_a_batch_is_in_flight_sends_nothing_twice(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    """A replay makes the next claim look from the start of the spool, past a batch still
    on its way. The claims after it once started from the last replayed id, below that
    batch, and sent its events again while their first request was still open."""
    sidecar, dead, delivered = await with_dead_letters(start_sidecar, fake, upstream={
        "batch_max_events": 5, "linger_ms": 0, "concurrency": 2})
    fake.reject_agent_ids = set()
    release = asyncio.Event()
    fake.script(Hold(release))
    requests = len(fake.requests)
    held = await send(sidecar, ["good"] * 5)
    await fake.wait_for_requests(requests + 1)
    code, _, err = await cli(sidecar, "dead-letters", "replay", "--reason", "rejected")
    assert code == 0, err
    await fake.wait_for_received(len(delivered) + len(dead))
    later = await send(sidecar, ["good"])  # the next claim, while the held batch is out
    await fake.wait_for_received(len(delivered) + len(dead) + len(later))
    release.set()
    spool = sidecar.server.spool
    await spool.wait_until(lambda: spool.counts.pending == 0 and not spool.inflight)
    ids = [int(ref.rsplit("-", 1)[1]) for ref in fake.received_ids()]
    assert sorted(ids) == sorted(delivered + dead + held + later)


async def test_after_a_purge_the_spool_decides_by_what_the_file_holds(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    """The running sidecar learns of a CLI change only at its next periodic recount (here
    never); a request in between met counts still holding the purged dead letters: 503
    SPOOL_FULL, or under drop_oldest, undelivered events evicted for nothing."""
    fake.reject_agent_ids = {"bad"}
    sidecar = await start_sidecar(
        spool={"max_events": 10, "when_full": "drop_oldest", "checkpoint_interval_s": 3600.0},
        upstream={"batch_max_events": 5, "concurrency": 1, "linger_ms": 0},
    )
    spool = sidecar.server.spool
    await send(sidecar, ["bad"] * 5)
    await spool.wait_until(lambda: spool.counts.dead == 5)
    release = asyncio.Event()
    fake.script(Hold(release))
    held = await send(sidecar, ["good"] * 5)
    await fake.wait_for_requests(len(fake.requests) + 1)  # all five on their way
    code, _, err = await cli(sidecar, "dead-letters", "purge", "--all", "--yes")
    assert code == 0, err
    later = await send(sidecar, ["good"] * 3)  # fits: the file holds 5 of 10
    release.set()
    await asyncio.wait_for(spool.wait_until(lambda: spool.counts.events == 0), 30)
    ids = [int(ref.rsplit("-", 1)[1]) for ref in fake.received_ids()]
    assert sorted(ids) == held + later
    _, metrics = await sidecar.get("/metrics")
    assert 'precogx_sidecar_events_dropped_total{reason="spool_full"} 0.0' in metrics


async def test_after_a_replay_a_new_dead_letter_is_not_pruned_for_room_it_has(
    start_sidecar: StartSidecar, fake: FakePrecogX
) -> None:
    """Pruning went by the dead letters counted before the replay: the next one was
    deleted at once, though the file held none."""
    fake.reject_agent_ids = {"bad"}
    sidecar = await start_sidecar(
        spool={"max_dead_events": 5, "checkpoint_interval_s": 3600.0},
        upstream={"batch_max_events": 5, "linger_ms": 0},
    )
    spool = sidecar.server.spool
    replayed = await send(sidecar, ["bad"] * 5)
    await spool.wait_until(lambda: spool.counts.dead == 5)
    fake.reject_agent_ids = {"worse"}
    code, _, err = await cli(sidecar, "dead-letters", "replay", "--reason", "rejected")
    assert code == 0, err
    dead = await send(sidecar, ["worse"])
    await asyncio.wait_for(
        spool.wait_until(lambda: spool.counts.pending == 0 and spool.counts.dead == 1), 30)
    with sqlite3.connect(sidecar.config.spool.path) as db:
        assert db.execute("SELECT id FROM events WHERE state = 'dead'").fetchall() == [
            (dead[0],)]
    assert sorted(int(ref.rsplit("-", 1)[1]) for ref in fake.received_ids()) == replayed
    _, metrics = await sidecar.get("/metrics")
    assert 'precogx_sidecar_events_dropped_total{reason="dead_letter_pruned"} 0.0' in metrics
