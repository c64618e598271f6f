"""`GET /metrics` as Prometheus scrapes it: requests, tokens and cost by model and status,
the ledger writer's queue, spool and batches, and upstream latency."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Meterline
from tests.reliability import METRICS_MODEL, new_customer, wait_for_fresh_window
from tests.support import ROOT, Database

MODEL = METRICS_MODEL
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Count me"}]


@pytest.fixture
def server(reliability_server: Meterline) -> Meterline:
    return reliability_server


def scrape(m: Meterline) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(f"{m.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_requests_tokens_and_cost_by_model_and_status(server: Meterline) -> None:
    _, _, key = new_customer(server.url)
    client = openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0)
    for _ in range(3):
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5)
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
    assert [chunk for chunk in stream]
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(
                model=MODEL, messages=HELLO, extra_body={"mock": {"status": 500}}
            )

    db = Database(server.database_url)
    deadline = time.monotonic() + 10
    while db.fetchval("SELECT count(*) FROM usage_ledger WHERE requested_model = $1", MODEL) < 6:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1.2)  # the writer's counters are sampled every second
    ledger = db.fetch(
        "SELECT sum(prompt_tokens) AS prompt, sum(completion_tokens) AS completion, "
        "sum(cost_usd) AS cost FROM usage_ledger WHERE requested_model = $1",
        MODEL,
    )[0]

    samples = scrape(server)
    ok = value(samples, "meterline_requests_total", endpoint="chat", model=MODEL, status="200")
    failed = value(samples, "meterline_requests_total", endpoint="chat", model=MODEL, status="500")
    assert (ok, failed) == (4, 2)
    assert value(samples, "meterline_tokens_total", model=MODEL, kind="prompt") == ledger["prompt"]
    assert (
        value(samples, "meterline_tokens_total", model=MODEL, kind="completion")
        == (ledger["completion"])
    )
    assert value(samples, "meterline_cost_usd_total", model=MODEL) == pytest.approx(
        float(ledger["cost"])
    )
    assert value(samples, "meterline_upstream_latency_seconds_count", provider="mock") >= 6
    assert value(samples, "meterline_time_to_first_token_seconds_count", provider="mock") >= 1
    # The ledger writer: nothing waiting, nothing spooled, rows written in timed batches.
    assert value(samples, "meterline_ledger_queue_depth") == 0
    assert value(samples, "meterline_ledger_spool_files") == 0
    assert value(samples, "meterline_ledger_spool_bytes") == 0
    assert value(samples, "meterline_ledger_rows_total", outcome="written") >= 6
    assert value(samples, "meterline_ledger_batch_seconds_count") >= 1


def test_limit_refusals_are_counted(server: Meterline) -> None:
    _, _, key = new_customer(server.url, tier="custom", rate_limit_rpm=1)
    client = openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0)
    wait_for_fresh_window()
    before = value(scrape(server), "meterline_limit_refusals_total", kind="requests")
    refused = 0
    for _ in range(3):
        try:
            client.chat.completions.create(model=MODEL, messages=HELLO)
        except openai.RateLimitError:
            refused += 1
    assert refused >= 2
    after = value(scrape(server), "meterline_limit_refusals_total", kind="requests")
    assert after - before == refused


def test_model_labels_stay_bounded() -> None:
    from service.metrics import registry

    labels = {registry.model_label(f"flood/{i}") for i in range(1000)}
    assert "other" in labels
    assert len(labels) <= 201


_FORKED_COUNTS = """
import os
from prometheus_client import CollectorRegistry, multiprocess
from service.metrics import registry

registry.REQUESTS.labels("chat", "m", "200").inc()
child = os.fork()
if child == 0:
    registry.REQUESTS.labels("chat", "m", "200").inc()
    os._exit(0)
os.waitpid(child, 0)
collected = CollectorRegistry()
multiprocess.MultiProcessCollector(collected)
print(collected.get_sample_value(
    "meterline_requests_total", {"endpoint": "chat", "model": "m", "status": "200"}
))
print(os.getpid(), child)
"""


def test_a_forked_process_counts_in_files_of_its_own(tmp_path: Path) -> None:
    """The process id the multiprocess values are filed under is read once per process,
    and again in a fork's child: the parent's and the child's counts stay apart."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", _FORKED_COUNTS],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    total, pids = done.stdout.split("\n")[:2]
    parent, child = pids.split()
    assert float(total) == 2.0
    assert {p.name for p in tmp_path.glob("counter_*.db")} == {
        f"counter_{parent}.db",
        f"counter_{child}.db",
    }
