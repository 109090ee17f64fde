from contextlib import contextmanager

from prometheus_client.parser import text_string_to_metric_families

from hicache_ha import BackendManager, Layout
from hicache_ha.config import parse
from hicache_ha.control.service import attach_control_plane
from hicache_ha.sim.servers import free_port
from tests.control.conftest import cluster_factory  # noqa: F401  (shared with the control-plane tests)


@contextmanager
def solo_process(backends: list[dict], health: dict | None = None, metrics_host: str = "127.0.0.1"):
    """One rank without a controller (admin.mode off, deployment "solo") serving /metrics, /healthz and
    /readyz on a free port: yields the manager and the endpoints' base URL; closes both."""
    port = free_port()
    doc = {"backends": backends, "admin": {"mode": "off", "deployment": "solo"},
           "observe": {"metrics_port": port, "metrics_host": metrics_host}}
    if health is not None:
        doc["health"] = health
    cfg = parse(doc, environ={})
    m = BackendManager(cfg, Layout(model="m"))
    plane = attach_control_plane(m, cfg)
    try:
        yield m, f"http://{metrics_host}:{port}"
    finally:
        plane.close()
        m.close()


def scrape(text: str) -> dict:
    """name -> list of (labels, value) samples of a Prometheus exposition."""
    out: dict = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out
