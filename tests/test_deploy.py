"""The deployment files agree with the code and with each other: compose.yaml sets only
settings Meterline reads, gives each replica a data volume of its own where the image keeps
its data directory, never lets replicas migrate, and HAProxy finds the replicas it names.
(tests/test_scale_out.py runs deploy/haproxy.cfg itself; .ci/run checks it with haproxy -c.)
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from service.providers.config import parse_providers
from service.settings import Settings
from tests.support import ROOT

COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()
HAPROXY_CFG = (ROOT / "deploy" / "haproxy.cfg").read_text()
REPLICAS = ["meterline-1", "meterline-2"]


def _meterline_services() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in COMPOSE["services"].items()
        if service.get("image") == "meterline:local"
    }


def test_compose_sets_only_settings_meterline_reads() -> None:
    fields = {name.upper() for name in Settings.model_fields}
    services = _meterline_services()
    assert set(services) == {"migrate", *REPLICAS}
    for name, service in services.items():
        names = {v for v in service["environment"] if v.startswith("METERLINE_")}
        assert names, name
        unknown = {v for v in names if v.removeprefix("METERLINE_") not in fields}
        assert not unknown, f"{name} sets {unknown}, which no setting reads"


def test_replicas_never_migrate_and_share_redis_and_postgres() -> None:
    services = _meterline_services()
    assert services["migrate"]["command"] == ["db", "upgrade"]
    for name in REPLICAS:
        env = services[name]["environment"]
        assert env["METERLINE_AUTO_MIGRATE"] == "false"
        assert env["METERLINE_WORKERS"] == "2"
        assert env["METERLINE_REDIS_URL"].startswith("redis://redis:")
        assert "@postgres:5432/" in env["METERLINE_DATABASE_URL"]
        assert services[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }


def test_each_replica_keeps_its_data_directory_in_a_volume_of_its_own() -> None:
    [data_dir] = re.findall(r"METERLINE_DATA_DIR=(\S+)", DOCKERFILE)
    assert f'VOLUME ["{data_dir}"]' in DOCKERFILE
    volumes = []
    for name in REPLICAS:
        mounts = [m.split(":") for m in COMPOSE["services"][name]["volumes"]]
        [volume] = [source for source, target, *_ in mounts if target == data_dir]
        assert volume in COMPOSE["volumes"], f"{name}: {volume} must be a named volume"
        volumes.append(volume)
    assert len(set(volumes)) == len(REPLICAS), "replicas must not share a spool"


def test_the_image_runs_as_an_unprivileged_user_with_a_health_check() -> None:
    [user] = re.findall(r"^USER (\S+)$", DOCKERFILE, re.MULTILINE)
    assert int(user.split(":")[0]) > 0
    assert "HEALTHCHECK" in DOCKERFILE and "/healthz" in DOCKERFILE
    assert DOCKERFILE.rstrip().endswith('CMD ["serve", "--host", "0.0.0.0"]')


def test_haproxy_sends_to_the_compose_replicas_and_retries_only_unsent_requests() -> None:
    defaults = re.findall(r'"\$\{METERLINE_REPLICA_\d-([\w.-]+):(\d+)\}"', HAPROXY_CFG)
    assert defaults == [(name, "8080") for name in REPLICAS]
    assert set(REPLICAS) <= set(COMPOSE["services"])
    haproxy = COMPOSE["services"]["haproxy"]
    assert "./deploy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in haproxy["volumes"]
    retry_on = re.findall(r"^\s*retry-on (.+)$", HAPROXY_CFG, re.MULTILINE)
    assert retry_on == ["conn-failure"], "a request that reached a replica is never re-sent"


def test_the_deployments_providers_file_loads() -> None:
    providers = parse_providers(
        (ROOT / "deploy" / "providers.yaml").read_text(), environ={"HYPERBOLIC_API_KEY": "k"}
    )
    assert [p.name for p in providers] == ["hyperbolic"]
    env = COMPOSE["services"]["meterline-1"]["environment"]
    assert all(p.api_key_env in env for p in providers), "compose must pass each provider key"
