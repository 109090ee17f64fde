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
from .config import load

app = typer.Typer(help="High availability for SGLang HiCache L3 storage.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
# soft_wrap: without a terminal (CI, pipes) lines are not folded at 80 columns.
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


@app.callback()
def _setup(log_level: str = typer.Option("WARNING", help="log level: DEBUG, INFO, WARNING, ERROR")) -> None:
    from rich.logging import RichHandler

    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        fail(f"--log-level {log_level!r}: use DEBUG, INFO, WARNING or ERROR")
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err, show_path=False)])


def fail(message: str, code: int = 2) -> None:
    err.print(f"[red]error:[/] {message}")
    raise typer.Exit(code)


@app.command()
def version() -> None:
    """Print the version."""
    console.print(__version__)


@app.command("check-config")
def check_config(path: Path = typer.Argument(..., help="YAML or JSON config file")) -> None:
    """Validate a config file and print it with every default filled in."""
    try:
        cfg = load(path)
    except ConfigError as exc:
        fail(str(exc))
    console.print_json(json.dumps(cfg.model_dump(mode="json")))


@app.command()
def demo(
    duration: float = typer.Option(30.0, min=3.0, help="seconds to run"),
    ranks: int = typer.Option(2, min=1, max=16, help="engine ranks (threads)"),
    page_kib: int = typer.Option(64, min=1, max=4096, help="page size in KiB"),
) -> None:
    """Simulated SGLang traffic through the data plane while the primary redis-server is frozen."""
    from .sim.demo import run_demo

    result = run_demo(duration=duration, ranks=ranks, page_kib=page_kib, console=console)
    st = result.stats
    worst = max((s.seconds * 1000 for s in st.samples), default=0.0)
    if st.errors_surfaced or st.verify_failures or worst > result.bound_ms:
        raise typer.Exit(1)


def main(argv: Optional[list[str]] = None) -> None:  # pragma: no cover - console entry
    app(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":  # python -m hicache_ha.cli
    main()
