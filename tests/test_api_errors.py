"""The billing API documents its errors from the classes that raise them.

Every error response in `/openapi.json` is made from error classes (service/errors.py): each
example is named after its class and carries the class's status and code, and the
description lists exactly those codes. An operation documents the errors it declares, and
the errors it answers with are among them.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from pricing.invoice import BillingPeriod
from service.app import create_app
from service.errors import MeterlineError
from service.settings import Settings
from tests.conftest import ADMIN_TOKEN, Meterline

SPEC: dict[str, Any] = create_app(Settings(database_url="postgresql://unused/none")).openapi()


def _error_classes(base: type[MeterlineError] = MeterlineError) -> dict[str, type[MeterlineError]]:
    found = {base.__name__: base}
    for sub in base.__subclasses__():
        found.update(_error_classes(sub))
    return found


def documented(method: str, path: str) -> dict[int, set[str]]:
    """The error codes an operation documents, per status."""
    responses = SPEC["paths"][path][method]["responses"]
    return {
        int(status): {
            example["value"]["error"]["code"]
            for example in entry["content"]["application/json"]["examples"].values()
        }
        for status, entry in responses.items()
        if int(status) >= 400
    }


def test_every_documented_error_is_made_from_its_class() -> None:
    classes = _error_classes()
    operations = [
        (method, path, operation)
        for path, methods in SPEC["paths"].items()
        for method, operation in methods.items()
    ]
    assert len(operations) > 20
    for method, path, operation in operations:
        for status, entry in operation["responses"].items():
            if int(status) < 400:
                continue
            where = f"{method.upper()} {path} {status}"
            examples = entry["content"]["application/json"]["examples"]
            assert examples, f"{where}: written by hand, not from error classes"
            lines = []
            for name, example in examples.items():
                kind = classes[name]
                error = example["value"]["error"]
                assert (kind.status_code, kind.code, kind.type) == (
                    int(status),
                    error["code"],
                    error["type"],
                ), where
                lines.append(f"`{kind.code}`: {kind.description}")
            assert entry["description"] == "\n\n".join(lines), where


def test_finalize_documents_exactly_the_conflicts_it_declares() -> None:
    errors = documented("post", "/billing/invoices/{invoice_id}/finalize")
    assert errors[409] == {
        "invoice_not_draft",
        "period_not_over",
        "ledger_write_in_progress",
        "flagged_usage",
        "unpriced_usage",
    }
    assert errors[503] == {"database_unavailable"}
    assert errors[404] == {"not_found"}
    # Another operation's conflict is not listed (until now one text listed them all).
    assert 409 not in documented("get", "/billing/invoices/{invoice_id}")
    assert documented("post", "/billing/invoices/{invoice_id}/void")[409] == {
        "invoice_not_finalized"
    }


def _assert_documented(response: httpx.Response, method: str, path: str, code: str) -> None:
    assert response.json()["error"]["code"] == code, response.text
    assert code in documented(method, path).get(response.status_code, set()), (
        f"{response.status_code} {code} is not documented for {method.upper()} {path}"
    )


@pytest.fixture
def admin(meterline: Meterline) -> httpx.Client:
    return meterline.admin()


def test_invoice_refusals_are_documented_where_they_happen(
    meterline: Meterline, admin: httpx.Client
) -> None:
    account_id, _ = meterline.customer()
    now = BillingPeriod.of(datetime.now(UTC))
    upcoming = BillingPeriod.parse(f"{now.end:%Y-%m}")
    path = "/billing/invoices"
    ahead = admin.post(path, json={"account_id": str(account_id), "period": str(upcoming)})
    assert ahead.status_code == 400
    _assert_documented(ahead, "post", path, "period_in_future")
    draft = admin.post(path, json={"account_id": str(account_id), "period": str(now)}).json()
    early = admin.post(f"{path}/{draft['id']}/finalize")
    assert early.status_code == 409
    _assert_documented(early, "post", "/billing/invoices/{invoice_id}/finalize", "period_not_over")
    void = admin.post(f"{path}/{draft['id']}/void", json={"reason": "test"})
    assert void.status_code == 409
    _assert_documented(void, "post", "/billing/invoices/{invoice_id}/void", "invoice_not_finalized")
    missing = admin.post(f"{path}/{uuid.uuid4()}/finalize")
    assert missing.status_code == 404
    _assert_documented(missing, "post", "/billing/invoices/{invoice_id}/finalize", "not_found")


def test_price_quote_and_task_refusals_are_documented_where_they_happen(
    meterline: Meterline, admin: httpx.Client
) -> None:
    model = f"errors-test/{uuid.uuid4().hex[:8]}"
    rates = {"model": model, "input_usd_per_mtok": "1", "output_usd_per_mtok": "2"}
    since = {"effective_from": "2026-01-01T00:00:00Z"}
    assert admin.post("/billing/prices", json={**rates, **since}).status_code == 201
    other = admin.post("/billing/prices", json={**rates, **since, "output_usd_per_mtok": "3"})
    assert other.status_code == 409
    _assert_documented(other, "post", "/billing/prices", "price_version_exists")
    lookup = admin.get("/billing/prices/lookup", params={"model": f"{model}-unpriced"})
    assert lookup.status_code == 404
    _assert_documented(lookup, "get", "/billing/prices/lookup", "unpriced_model")

    account_id, key = meterline.customer()
    task = {"account_id": str(account_id), "task_type": "errors"}
    unpriced = admin.post("/billing/quotes", json={**task, "model": f"{model}-unpriced"})
    assert unpriced.status_code == 422
    _assert_documented(unpriced, "post", "/billing/quotes", "model_not_priced")
    no_inputs = admin.post("/billing/quotes", json={**task, "model": model})
    assert no_inputs.status_code == 422
    _assert_documented(no_inputs, "post", "/billing/quotes", "quote_needs_estimate_inputs")

    estimate = {**task, "model": model, "prompt_tokens": 10, "max_completion_tokens": 10}
    accept = "/billing/quotes/{quote_id}/accept"
    first = admin.post("/billing/quotes", json=estimate).json()["id"]
    assert admin.post(f"/billing/quotes/{first}/accept", json={"task_id": "t"}).status_code == 201
    again = admin.post(f"/billing/quotes/{first}/accept", json={"task_id": "u"})
    assert again.status_code == 409
    _assert_documented(again, "post", accept, "quote_already_accepted")
    second = admin.post("/billing/quotes", json=estimate).json()["id"]
    in_use = admin.post(f"/billing/quotes/{second}/accept", json={"task_id": "t"})
    assert in_use.status_code == 409
    _assert_documented(in_use, "post", accept, "task_id_in_use")

    complete = "/billing/tasks/{task_id}/complete"
    outcome = {"outcome": "succeeded"}
    with httpx.Client(base_url=meterline.url, headers={"Authorization": f"Bearer {key}"}) as own:
        refused = own.post("/billing/tasks/t/complete", json=outcome)
        assert refused.status_code == 403
        _assert_documented(refused, "post", complete, "forbidden")
        changing = own.patch(f"/billing/accounts/{account_id}", json={"name": "mine"})
        assert changing.status_code == 403
        _assert_documented(changing, "patch", "/billing/accounts/{account_id}", "forbidden")
    scoped = {"account_id": str(account_id)}
    assert admin.post("/billing/tasks/t/complete", json=outcome, params=scoped).status_code == 200
    twice = admin.post("/billing/tasks/t/complete", json=outcome, params=scoped)
    assert twice.status_code == 409
    _assert_documented(twice, "post", complete, "task_already_completed")


def test_credential_and_parameter_refusals_are_documented_on_every_operation(
    meterline: Meterline,
) -> None:
    path = "/billing/usage"
    with httpx.Client(base_url=meterline.url) as client:
        none = client.get(path)
        _assert_documented(none, "get", path, "invalid_api_key")
        both = client.get(
            path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "X-API-Key": "ml-other"}
        )
        _assert_documented(both, "get", path, "conflicting_credentials")
        bad = client.get(
            path, params={"group_by": "colour"}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        _assert_documented(bad, "get", path, "validation_error")
    for path, methods in SPEC["paths"].items():
        if not path.startswith("/billing/"):
            continue
        for method in methods:
            errors = documented(method, path)
            assert errors[401] == {"invalid_api_key"}, (method, path)
            assert {"conflicting_credentials", "http_error"} <= errors[400], (method, path)
            assert "validation_error" in errors[422], (method, path)
