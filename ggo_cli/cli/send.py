"""``ggo-cli send OUT``: deliver a results folder's SEG, SR and SC to the PACS (no inference)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from ..delivery.settings import resolve_targets
from ..errors import EXIT_UNDELIVERED, InputError
from ..run.deliveries import report_lines
from .options import CallingAeOpt, JsonOpt, SendConfigOpt, SendObjectsOpt, SendOpt
from .report import refresh_report, tree_like_csv

log = logging.getLogger(__name__)


def send_command(
    out: Annotated[
        Path, typer.Argument(help="A results folder: the --out folder of segment runs.")
    ],
    send: SendOpt = None,
    send_objects: SendObjectsOpt = None,
    send_config: SendConfigOpt = None,
    calling_ae_title: CallingAeOpt = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Send every object again, also those a destination already holds."
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> int:
    """Deliver what a results folder holds to the PACS, without any inference.

    Sends each destination the objects it lacks and those it refused before (--force: all),
    and rebuilds the CSV's delivery column and the report page. Exit 0 when every destination
    holds every object, 9 when some are still pending or refused.
    """
    from ..run.resend import send_results

    targets = resolve_targets(
        send or (),
        objects=send_objects,
        config_file=send_config,
        calling_ae_title=calling_ae_title,
    )
    if not targets:
        raise InputError(
            "no destination: give --send DEST or --send-config FILE, or set GGO_SEND or "
            "GGO_SEND_CONFIG"
        )
    reports = send_results(out, targets, force=force)
    refresh_report(out, tree_like_csv(out))  # the page shows the CSV's new delivery column
    for level, line in report_lines(reports):
        log.log(level, "%s", line)
    if as_json:
        typer.echo(json.dumps({"delivery": [r.to_dict() for r in reports]}, indent=2))
    if all(report.complete for report in reports):
        return 0
    log.error(
        "not every object is delivered (exit %d); run 'ggo-cli send' again when the "
        "destination is back",
        EXIT_UNDELIVERED,
    )
    return EXIT_UNDELIVERED
