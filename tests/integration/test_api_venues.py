"""`/api/venues` and what venues add to the rest of the API (SPEC 10, 11)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.factories import state
from tests.integration.conftest import Api


async def test_venues_are_listed_paused_and_resumed_with_who_and_why(api: Api) -> None:
    """Every venue met is listed; a pause says by whom and why, is idempotent, shows in the
    deliveries (`venue_paused`), the stats and the metrics; resume clears it."""
    await api.write(state("b1", venue_id="v-a"), state("b2", venue_id="v-b"))
    listed = (await api.client.get("/api/venues")).json()
    assert [v["venue_id"] for v in listed["items"]] == ["v-a", "v-b"]
    assert listed["items"][0]["deliveries"] == {"pending": 1, "retrying": 0, "dead": 0}
    paused = await api.client.post("/api/venues/v-a/pause", json={"reason": "POS swap"})
    assert paused.status_code == 200, paused.text
    venue = paused.json()
    assert (venue["paused"], venue["paused_by"], venue["pause_reason"]) == (
        True,
        "admin",
        "POS swap",
    )
    again = await api.client.post("/api/venues/v-a/pause", json={"reason": "other"})
    assert again.json()["pause_reason"] == "POS swap"  # pausing a paused venue changes nothing
    flags = {d["venue_id"]: d["venue_paused"] for d in await api.deliveries()}
    assert flags == {"v-a": True, "v-b": False}
    stats = (await api.client.get("/api/stats")).json()
    assert stats["venues_paused"] == 1 and stats["rate_limit"] == 0
    metrics = (await api.client.get("/metrics")).text
    gauge = next(
        f
        for f in text_string_to_metric_families(metrics)
        if f.name == "mozrest_relay_venues_paused"
    )
    assert gauge.samples[0].value == 1
    resumed = await api.client.post("/api/venues/v-a/resume")
    assert resumed.json()["paused"] is False and resumed.json()["paused_by"] is None


async def test_venue_pages_follow_the_cursor(api: Api) -> None:
    await api.write(*(state(f"b{n}", venue_id=f"v-{n:02d}") for n in range(5)))
    first = (await api.client.get("/api/venues", params={"limit": 2})).json()
    second = (
        await api.client.get("/api/venues", params={"limit": 2, "cursor": first["next_cursor"]})
    ).json()
    assert [v["venue_id"] for v in first["items"] + second["items"]] == [
        "v-00",
        "v-01",
        "v-02",
        "v-03",
    ]
    bad = await api.client.get("/api/venues", params={"cursor": "nope"})
    assert bad.status_code == 422


async def test_send_items_is_set_per_venue_and_bad_input_is_refused(api: Api) -> None:
    """PATCH takes true, false or null; anything else, an unknown field, or a reason over 500
    characters is a 422; an unknown venue's detail or resume is a 404."""
    await api.write(state("b1", venue_id="v-a"))
    for value in (False, True, None):
        answer = await api.client.patch("/api/venues/v-a", json={"send_items": value})
        assert answer.status_code == 200 and answer.json()["send_items"] is value
    for body in ({"send_items": "yes"}, {"send_items": 1}, {"colour": "red"}):
        assert (await api.client.patch("/api/venues/v-a", json=body)).status_code == 422
    long = await api.client.post("/api/venues/v-a/pause", json={"reason": "x" * 501})
    assert long.status_code == 422
    assert (await api.client.get("/api/venues/never")).status_code == 404
    missing = await api.client.post("/api/venues/never/resume")
    assert missing.status_code == 404 and "never" in missing.json()["detail"]


async def test_dead_deliveries_of_the_last_hour_show_which_venue_to_pause(api: Api) -> None:
    """A venue whose answers are all 4xx shows its dead deliveries of the last hour."""
    await api.write(state("b1", venue_id="v-bad"), state("b2", venue_id="v-bad"))
    await api.answer(400)
    venue = (await api.client.get("/api/venues/v-bad")).json()
    assert venue["dead_last_hour"] == 2 and venue["deliveries"]["dead"] == 2


async def test_resync_answers_how_many_it_queued_and_is_audited(api: Api) -> None:
    """POST /resync answers `{"queued": N}`; its deliveries say `reason: resync`; the call is
    in the audit trail; an unknown venue is a 404."""
    await api.write(state("b1", venue_id="v-a"))
    await api.answer(200)
    answer = await api.client.post("/api/venues/v-a/resync", json={})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"queued": 1}
    reasons = sorted(d["reason"] for d in await api.deliveries(venue_id="v-a"))
    assert reasons == ["change", "resync"]
    audit = (await api.client.get("/api/audit", params={"action": "venue.resync"})).json()
    assert [(row["target"], row["result"]) for row in audit["items"]] == [("v-a", "ok")]
    assert (await api.client.post("/api/venues/never/resync")).status_code == 404
    future = await api.client.post("/api/venues/v-a/resync", json={"since": "2999-01-01T00:00:00Z"})
    assert future.status_code == 422 and "future" in future.text
    for bad in ({"since": "yesterday"}, {"since": 12.5e20}, {"until": "x"}):
        assert (await api.client.post("/api/venues/v-a/resync", json=bad)).status_code == 422
    await api.write(state("held-1", venue_id="v-none", status="confirmed"))
    nothing = await api.client.post("/api/venues/v-none/resync")
    assert nothing.status_code == 200 and nothing.json() == {"queued": 0}
