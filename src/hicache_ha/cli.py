"""The ``hicache-ha`` command."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from . import __version__
from .backends.errors import ConfigError
from .config import effective_document, load

app = typer.Typer(help="High availability for SGLang HiCache L3 storage.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
# soft_wrap, and a wide page without a terminal (CI, pipes): lines and tables are not folded at 80 columns.
_WIDTH = None if sys.stdout.isatty() else 160
console = Console(soft_wrap=True, width=_WIDTH)
err = Console(stderr=True, soft_wrap=True, width=_WIDTH)


def _print_version(value: bool) -> None:
    if value:
        console.print(f"hicache-ha {__version__}")
        raise typer.Exit()


@app.callback()
def _setup(log_level: str = typer.Option("WARNING", help="log level: DEBUG, INFO, WARNING, ERROR"),
           log_format: str = typer.Option("text", envvar="HICACHE_HA_LOG_FORMAT",
                                          help="text (for people) or json (one object per line)"),
           _version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                         help="print the version and exit")) -> None:
    from rich.logging import RichHandler

    from .observe.logs import JsonFormatter

    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        fail(f"--log-level {log_level!r}: use DEBUG, INFO, WARNING or ERROR")
    if log_format not in ("text", "json"):
        fail(f"--log-format {log_format!r}: use text or json")
    if log_format == "json":
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    else:
        handler = RichHandler(console=err, show_path=False)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)


def fail(message: str, code: int = 2) -> None:
    err.print(f"[red]error:[/] {message}")
    raise typer.Exit(code)


@app.command()
def version() -> None:
    """Print the version."""
    console.print(__version__)


@app.command("alert-rules")
def alert_rules(runbook_base: str = typer.Option(
        None, "--runbook-base", show_default=False,
        help="where your copy of docs/runbooks.md is served (default: the project's)"),
        kubernetes: bool = typer.Option(False, "--kubernetes", help="as a PrometheusRule resource")) -> None:
    """Print the Prometheus alert rules (YAML), runbook links built from one base."""
    from .observe.alerts import RUNBOOK_BASE, prometheus_rule, render

    base = runbook_base or RUNBOOK_BASE
    if not base.startswith(("http://", "https://")):
        fail(f"--runbook-base {base!r}: give an absolute http(s) URL")
    sys.stdout.write(prometheus_rule(base) if kubernetes else render(base))


@app.command("check-config")
def check_config(path: Path = typer.Argument(..., help="YAML or JSON config file")) -> None:
    """Validate a config file (with HICACHE_HA__… overrides applied) and print the whole effective document,
    every default filled in and secrets redacted."""
    try:
        cfg = load(path)
    except ConfigError as exc:
        fail(str(exc))
    console.print_json(json.dumps(effective_document(cfg)))


@app.command()
def demo(
    duration: float = typer.Option(30.0, min=3.0, help="seconds to run"),
    ranks: int = typer.Option(2, min=1, max=16, help="engine ranks (threads)"),
    page_kib: int = typer.Option(64, min=1, max=4096, help="page size in KiB (sim engine)"),
    engine: str = typer.Option("sim", help="sim: the simulator's ranks; sglang: SGLang's own HiCacheController "
                                           "on CPU (needs the sglang wheel: make install-sglang)"),
) -> None:
    """SGLang's storage traffic through the data plane while the primary fails (a frozen redis-server)."""
    from .sim.demo import run_demo

    if engine not in ("sim", "sglang"):
        fail(f"--engine {engine!r}: use sim or sglang")
    if engine == "sglang":
        try:
            import sglang.srt.managers.cache_controller  # noqa: F401
        except ImportError as exc:
            fail(f"--engine sglang needs the sglang wheel and its CPU dependencies (make install-sglang): {exc}")
    result = run_demo(duration=duration, ranks=ranks, page_kib=page_kib, engine=engine, console=console)
    if not result.clean:  # a slow call on a busy machine is reported, not failed: see the summary
        raise typer.Exit(1)


# -- the control plane -----------------------------------------------------------------------------
URL_OPT = typer.Option("http://127.0.0.1:18080", "--url", envvar="HICACHE_HA_URL", help="controller URL")
KEY_OPT = typer.Option(None, "--api-key", envvar="HICACHE_HA_ADMIN_API_KEY", show_default=False,
                       help="admin key (default: $HICACHE_HA_ADMIN_API_KEY)")
JSON_OPT = typer.Option(False, "--json", help="print the raw JSON answer")
CACERT_OPT = typer.Option(None, "--cacert", envvar="HICACHE_HA_CACERT", show_default=False,
                          help="CA file that signed the controller's HTTPS certificate (admin.tls_cert_file)")


def _client(url: str, key: Optional[str], cacert: Optional[str] = None):
    from .control.client import AdminClient

    return AdminClient(url, key, cacert=cacert)


def _call(fn, *args, **kwargs):
    from .control.client import AdminError

    try:
        return fn(*args, **kwargs)
    except AdminError as exc:
        fail(f"{exc}{_details(exc.body)}", 1)


def _details(body) -> str:
    """Everything the API said besides its message: failed ranks one per line, then every other field."""
    if not isinstance(body, dict):
        return ""
    lines = [f"rank {f['rank']}: {f['reason']}" for f in body.get("failed", []) if isinstance(f, dict)]
    for key, value in body.items():
        if key in ("error", "detail", "failed") or value in (None, [], {}, ""):
            continue
        shown = ", ".join(map(str, value)) if isinstance(value, list) else json.dumps(value) \
            if isinstance(value, dict) else str(value)
        lines.append(f"{key.replace('_', ' ')}: {shown}")
    return "".join(f"\n  {line}" for line in lines)


def _print_status(body: dict) -> None:
    from rich.table import Table

    console.print(f"epoch [bold]{body['epoch']}[/]  active [bold]{body['active']}[/]  "
                  f"ranks {len([r for r in body['ranks'] if r['alive']])}/{body['expected_ranks']}"
                  + (f"  [red]missing {body['missing_ranks']}[/]" if body["missing_ranks"] else ""))
    names = [b["name"] for b in body["backends"]]
    table = Table()
    for col in ["rank", "alive", "epoch", "active", "in flight", *names]:
        table.add_column(col)
    colour = {"healthy": "green", "recovering": "yellow", "circuit_broken": "red", "detached": "dim"}
    for r in body["ranks"]:
        states = [f"[{colour.get(r['backends'].get(n), 'white')}]{r['backends'].get(n, '-')}[/]" for n in names]
        table.add_row(str(r["rank"]), "yes" if r["alive"] else "[red]no[/]", str(r["epoch"]), str(r["active"]),
                      str(r["in_flight"]), *states)
    console.print(table)


@app.command()
def status(url: str = URL_OPT, api_key: Optional[str] = KEY_OPT, as_json: bool = JSON_OPT,
           cacert: Optional[str] = CACERT_OPT) -> None:
    """Show the desired state and every rank's epoch, active member and member states."""
    body = _call(_client(url, api_key, cacert).status)
    console.print_json(json.dumps(body)) if as_json else _print_status(body)


@app.command()
def switch(backend: str = typer.Argument(..., help="member to switch every rank to"),
           force: bool = typer.Option(False, "--force", help="abandon in-flight calls; switch the ranks present"),
           drain_timeout: float = typer.Option(5.0, "--drain-timeout", min=0, help="seconds in-flight calls may take"),
           url: str = URL_OPT, api_key: Optional[str] = KEY_OPT, as_json: bool = JSON_OPT,
           cacert: Optional[str] = CACERT_OPT) -> None:
    """Switch every rank to another member (two-phase, rolled back on failure)."""
    body = _call(_client(url, api_key, cacert).switch, backend, force=force, drain_timeout_s=drain_timeout)
    console.print_json(json.dumps(body)) if as_json else console.print(
        f"switched to [bold]{body['active']}[/] at epoch {body['epoch']} on ranks {body['ranks']}")


@app.command()
def attach(spec_file: Path = typer.Option(..., "--spec", help="YAML/JSON file with one backend section"),
           force: bool = typer.Option(False, "--force"), drain_timeout: float = typer.Option(5.0, "--drain-timeout", min=0),
           url: str = URL_OPT, api_key: Optional[str] = KEY_OPT, as_json: bool = JSON_OPT,
           cacert: Optional[str] = CACERT_OPT) -> None:
    """Attach a new member from a spec and switch every rank to it (its type from the allow-list, its
    files under admin.attach_roots)."""
    import yaml

    try:
        spec = yaml.safe_load(spec_file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        fail(f"cannot read spec {str(spec_file)!r}: {exc}")
    if not isinstance(spec, dict):
        fail("the spec must be one backend section (a mapping with name and type)")
    body = _call(_client(url, api_key, cacert).switch, spec=spec, force=force, drain_timeout_s=drain_timeout)
    console.print_json(json.dumps(body)) if as_json else console.print(
        f"attached [bold]{body['active']}[/] at epoch {body['epoch']}")


@app.command()
def detach(force: bool = typer.Option(False, "--force"), drain_timeout: float = typer.Option(5.0, "--drain-timeout", min=0),
           url: str = URL_OPT, api_key: Optional[str] = KEY_OPT, as_json: bool = JSON_OPT,
           cacert: Optional[str] = CACERT_OPT) -> None:
    """Detach L3 on every rank: the engine runs without it (reads miss, writes are dropped)."""
    body = _call(_client(url, api_key, cacert).detach, force=force, drain_timeout_s=drain_timeout)
    console.print_json(json.dumps(body)) if as_json else console.print(f"detached at epoch {body['epoch']}")


@app.command()
def remove(name: str = typer.Argument(..., help="a member attached with `attach` (not the active one)"),
           url: str = URL_OPT, api_key: Optional[str] = KEY_OPT, as_json: bool = JSON_OPT,
           cacert: Optional[str] = CACERT_OPT) -> None:
    """Remove a member attached over the API from every rank (configured members stay)."""
    body = _call(_client(url, api_key, cacert).remove, name)
    console.print_json(json.dumps(body)) if as_json else console.print(f"removed {body['removed']}")


@app.command()
def events(limit: int = typer.Option(50, min=1, max=2000), url: str = URL_OPT, api_key: Optional[str] = KEY_OPT,
           as_json: bool = JSON_OPT, cacert: Optional[str] = CACERT_OPT) -> None:
    """Recent transitions: time, rank, member, from, to, reason."""
    import datetime

    body = _call(_client(url, api_key, cacert).events, limit)
    if as_json:
        console.print_json(json.dumps(body))
        return
    for e in body:
        when = datetime.datetime.fromtimestamp(e["time"]).strftime("%H:%M:%S.%f")[:-3]
        console.print(f"{when}  rank {e['rank'] if e['rank'] is not None else '-'}  {e['backend'] or '-'}: "
                      f"{e['from']} → {e['to']}  ({e['reason']})")


@app.command()
def controller(config: Path = typer.Option(..., "--config", help="the HA config (YAML/JSON)"),
               admin_api_key: Optional[str] = typer.Option(None, "--admin-api-key", show_default=False,
                                                           help="admin key (or $HICACHE_HA_ADMIN_API_KEY, admin.api_key_file)"),
               expected_ranks: Optional[int] = typer.Option(None, "--expected-ranks", min=1,
                                                            help="ranks in the deployment (default admin.expected_ranks)")) -> None:
    """Run a standalone controller: the admin API plus the endpoint the ranks' agents connect to."""
    import signal
    import threading

    from .control.service import start_controller

    try:
        cfg = load(config)
    except ConfigError as exc:
        fail(str(exc))
    ranks = expected_ranks or cfg.admin.expected_ranks
    if ranks is None:
        fail("give --expected-ranks or admin.expected_ranks: the controller never switches with ranks missing")
    try:
        service = start_controller(cfg, expected_ranks=ranks, api_key=admin_api_key)
    except (OSError, ConfigError) as exc:
        fail(f"cannot start the controller: {exc}")
    console.print(f"hicache-ha controller: admin API on {service.url}, agents connect to "
                  f"tcp://{cfg.admin.host}:{cfg.admin.agent_port}, expecting {ranks} ranks")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    service.close()


def main(argv: Optional[list[str]] = None) -> None:  # pragma: no cover - console entry
    app(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":  # python -m hicache_ha.cli
    main()
