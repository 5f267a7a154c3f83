"""Who sees a job, through the real daemon: with an admin token the listing is the admin's, without one
it lists the caller's own client key's jobs; a job's id reads it, unless the caller presents another
client key (404); an Idempotency-Key is each client's own and never leads to another client's job.

Real daemons (the policies a user writes: `admin.token_file`, `queue.fairness.key`), real ctl workers,
the default SQLite job store.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import SupervisorProcess, fast_config, wait_until

pytestmark = pytest.mark.e2e

ASYNC = {"Prefer": "respond-async"}
TOKEN = "s3cret-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
A = {"X-Client-ID": "tenant-a"}
B = {"X-Client-ID": "tenant-b"}
FAIRNESS = {"fairness": {"key": "header:X-Client-ID"}}
UNKNOWN = "0123456789abcdef0123456789abcdef"


def _token_file(tmp_path: Path) -> str:
    p = tmp_path / "admin-token"
    p.write_text(TOKEN + "\n")
    return str(p)


async def _submit(sp: SupervisorProcess, target: str, headers: dict[str, str]) -> str:
    async with sp.session.get(target, headers={**ASYNC, **headers}) as r:
        assert r.status == 202, await r.text()
        return (await r.json())["id"]


async def _get(sp: SupervisorProcess, path: str, headers: dict[str, str] | None = None,
               method: str = "GET") -> tuple[int, dict, dict]:
    async with sp.session.request(method, path, headers=headers or {}) as r:
        return r.status, dict(r.headers), await r.json()


async def _status(sp: SupervisorProcess, job_id: str, headers: dict[str, str]) -> str:
    return (await _get(sp, f"/jobs/{job_id}", headers))[2]["status"]


async def _listed(sp: SupervisorProcess, headers: dict[str, str]) -> list[str]:
    status, _, body = await _get(sp, "/jobs", headers)
    assert status == 200, body
    return [j["id"] for j in body["jobs"]]


def _assert_unauthorized(status: int, headers: dict, body: dict) -> None:
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert body["error"]["type"] == "unauthorized" and body["error"]["message"] and body["error"]["request_id"]


async def test_with_an_admin_token_the_listing_needs_it_and_the_id_alone_reads_the_job(
        supervisor_factory, tmp_path: Path) -> None:
    sp = await supervisor_factory(fast_config(admin={"token_file": _token_file(tmp_path)}))
    job = await _submit(sp, "/hello", {})
    await wait_until(lambda: _eq(_status(sp, job, {}), "succeeded"), 20, "job done")

    _assert_unauthorized(*await _get(sp, "/jobs"))
    _assert_unauthorized(*await _get(sp, "/jobs?status=succeeded", {"Authorization": "Bearer wrong"}))
    assert await _listed(sp, ADMIN) == [job]

    status, _, body = await _get(sp, f"/jobs/{job}")                       # the id alone: the job...
    assert status == 200 and body["id"] == job
    async with sp.session.get(f"/jobs/{job}/result") as r:                  # ...and its result
        assert r.status == 200 and (await r.text())


async def test_with_client_keys_each_client_reads_only_its_own_jobs_and_only_the_admin_lists(
        supervisor_factory, tmp_path: Path) -> None:
    sp = await supervisor_factory(fast_config(queue={"concurrency": 2, **FAIRNESS},
                                              admin={"token_file": _token_file(tmp_path)}))
    a_done = await _submit(sp, "/hello", A)
    a_slow = await _submit(sp, "/sleep?s=60", A)
    b_done = await _submit(sp, "/hello", B)
    await wait_until(lambda: _eq(_status(sp, a_done, A), "succeeded"), 20, "a's job done")
    await wait_until(lambda: _eq(_status(sp, b_done, B), "succeeded"), 20, "b's job done")
    await wait_until(lambda: _eq(_status(sp, a_slow, A), "running"), 20, "a's slow job running")

    # with an admin token the listing is the admin's: a client key is a claim, not a credential
    assert sorted(await _listed(sp, ADMIN)) == sorted([a_done, a_slow, b_done])
    for who in (A, B, {}):
        _assert_unauthorized(*await _get(sp, "/jobs", who))

    for job, tail, method in ((a_done, "", "GET"), (a_done, "/result", "GET"), (a_slow, "", "DELETE")):
        unknown = (await _get(sp, f"/jobs/{UNKNOWN}{tail}", B, method))[2]["error"]
        for other in (B, {}):                                               # another key, or none
            status, _, body = await _get(sp, f"/jobs/{job}{tail}", other, method)
            assert status == 404 and body["error"]["type"] == "not_found", (tail, method, other, body)
            assert body["error"]["message"] == unknown["message"].replace(UNKNOWN, job)  # as if it did not exist
    assert await _status(sp, a_slow, A) == "running"                         # b's DELETE cancelled nothing

    async with sp.session.get(f"/jobs/{a_done}/result", headers=A) as r:     # its own key, or the admin
        assert r.status == 200
    assert (await _get(sp, f"/jobs/{b_done}", ADMIN))[0] == 200
    status, _, body = await _get(sp, f"/jobs/{a_slow}", A, "DELETE")
    assert status == 200 and body["status"] == "cancelled"


async def test_with_client_keys_and_no_admin_token_anonymous_callers_list_only_anonymous_jobs(
        supervisor_factory) -> None:
    sp = await supervisor_factory(fast_config(queue=FAIRNESS))
    mine = await _submit(sp, "/hello", A)
    anon = await _submit(sp, "/hello", {})
    await wait_until(lambda: _eq(_status(sp, mine, A), "succeeded"), 20, "job done")
    assert await _listed(sp, A) == [mine]                                   # no admin token: its own key's
    assert await _listed(sp, {}) == [anon]                                  # the shared `anonymous` key
    assert (await _get(sp, f"/jobs/{anon}", A))[0] == 200                   # an anonymous job: its id is enough
    assert (await _get(sp, f"/jobs/{mine}", {}))[0] == 404


async def test_an_idempotency_key_is_each_clients_own_and_never_names_another_clients_job(
        supervisor_factory, tmp_path: Path) -> None:
    sp = await supervisor_factory(fast_config(queue=FAIRNESS, admin={"token_file": _token_file(tmp_path)}))
    key = {"Idempotency-Key": "batch-2026-12-05"}
    a_job = await _submit(sp, "/hello", {**A, **key})
    # the same key from another client, same request or another: its own job, never a's
    b_same = await _submit(sp, "/hello", {**B, **key})
    b_other = await _submit(sp, "/hello?x=1", {**B, "Idempotency-Key": "other"})
    assert len({a_job, b_same, b_other}) == 3
    assert await _submit(sp, "/hello", {**A, **key}) == a_job                # a's own retry: a's own job
    async with sp.session.get("/hello?x=2", headers={**ASYNC, **A, **key}) as r:  # a's key, another request
        body = await r.text()
        assert r.status == 422 and a_job not in body, body                   # refused without naming the job


async def _eq(aw, want) -> bool:
    return await aw == want
