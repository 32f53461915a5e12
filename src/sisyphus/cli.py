"""The ``sisyphus`` command: builds settings and calls the package; holds no logic.

Every option that has a ``SISYPHUS_*`` variable comes from :mod:`sisyphus.config`;
this module spells no variable name of its own.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence
from typing import Any

from sisyphus import __version__, client, config, logs
from sisyphus.errors import ConfigError

_TARGET = (
    "It calls the running service's HTTP API (--url), or with --redis writes straight to "
    "the Redis the service reads, through the same script as the service, so the message is "
    "retained for resuming streams. Prints the event id the message got."
)


def _add_options(parser: argparse.ArgumentParser, options: tuple[config.Option, ...]) -> None:
    """One flag per option, its help naming the variable and the default."""
    for option in options:
        parser.add_argument(
            option.flag,
            dest=option.name,
            metavar=option.metavar,
            help=f"{option.help} (env {option.env}, default {option.shown_default})".replace(
                "%", "%%"
            ),
        )


def _values(
    args: argparse.Namespace, options: tuple[config.Option, ...], command: str
) -> dict[str, Any] | None:
    """The options' values, or ``None`` after printing the one-line error."""
    flags = {option.name: getattr(args, option.name) for option in options}
    try:
        return config.read(options, flags)
    except ConfigError as exc:
        print(f"sisyphus {command}: {exc}", file=sys.stderr)
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sisyphus", description="Push notifications to browsers over Server-Sent Events."
    )
    parser.add_argument("--version", action="version", version=f"sisyphus {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the service",
        description="Run the service. Every flag also reads a SISYPHUS_* variable; "
        "a flag wins over the variable.",
    )
    _add_options(serve, config.OPTIONS)
    publish = sub.add_parser(
        "publish",
        help="publish a message on a channel",
        description="Publish a message on a channel: every stream that may read the channel "
        "receives it. " + _TARGET,
    )
    publish.add_argument("channel", help="the channel, e.g. room:918 or news")
    publish.add_argument("data", help="the message; '-' reads it from standard input")
    _add_options(publish, config.PUBLISHER_OPTIONS)
    for verb, text, description in (
        (
            "grant",
            "let a user read channels",
            "Add channels to the user's set (user:USER:channels), then publish the notice "
            '{"rights": "granted", ...} on user:USER, so the user\'s open streams subscribe '
            "to them at once.",
        ),
        (
            "revoke",
            "take channels away from a user",
            "Remove channels from the user's set (user:USER:channels), then publish the "
            'notice {"rights": "revoked", ...} on user:USER, so the user\'s open streams drop '
            "them at once; a stream left with no channel ends with `disconnected`.",
        ),
    ):
        rights = sub.add_parser(verb, help=text, description=f"{description} {_TARGET}")
        rights.add_argument("user", help="the user id (1 to 64 of A-Z a-z 0-9 _ -)")
        rights.add_argument(
            "channels", nargs="+", metavar="CHANNEL", help="one or more channels, e.g. room:918"
        )
        _add_options(rights, config.PUBLISHER_OPTIONS)
    position = sub.add_parser(
        "position",
        help="print the id of now (render it into a page; its stream resumes there)",
        description="Print the event id of now. Render it into a page and connect with "
        "lastEventId=<it>: the stream then replays whatever was published in between.",
    )
    _add_options(position, config.PUBLISHER_OPTIONS)
    token = sub.add_parser(
        "token",
        help="mint a signed user token",
        description="Print a token that lets USER listen, signed with the service's secret.",
    )
    token.add_argument("user", help="the user id (the token's `sub`)")
    token.add_argument(
        "--ttl", type=float, default=3600.0, help="seconds until it expires (default %(default)s)"
    )
    token.add_argument(
        "--algorithm",
        default="HS256",
        choices=["HS256", "HS384", "HS512"],
        help="the signing algorithm; the service must accept it (default %(default)s)",
    )
    _add_options(token, config.TOKEN_OPTIONS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args, argv)
    if args.command == "token":
        return _token(args)
    values = _values(args, config.PUBLISHER_OPTIONS, args.command)
    if values is None:
        return 2
    publisher = client.connect(**values)
    try:
        if args.command == "publish":
            data = sys.stdin.read() if args.data == "-" else args.data
            event_id = publisher.publish(args.channel, data)
        elif args.command == "grant":
            event_id = publisher.grant(args.user, args.channels)
        elif args.command == "revoke":
            event_id = publisher.revoke(args.user, args.channels)
        else:
            event_id = publisher.position()
        print(event_id)
    except client.SisyphusClientError as exc:
        print(f"sisyphus {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


def _token(args: argparse.Namespace) -> int:
    values = _values(args, config.TOKEN_OPTIONS, "token")
    if values is None:
        return 2
    secret = config.option("secret")
    if not values["secret"]:
        print(f"sisyphus token: give {secret.flag} or set {secret.env}", file=sys.stderr)
        return 2
    try:
        token = client.mint_token(
            values["secret"],
            args.user,
            ttl=args.ttl,
            algorithm=args.algorithm,
            audience=values["audience"],
            issuer=values["issuer"],
        )
    except ValueError as exc:
        print(f"sisyphus token: {exc}", file=sys.stderr)
        return 1
    print(token)
    return 0


def _serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    flags = {option.name: getattr(args, option.name) for option in config.OPTIONS}
    try:
        settings = config.load(flags)
    except ConfigError as exc:
        print(f"sisyphus serve: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    if settings.workers > 1:
        from sisyphus.server.supervisor import supervise

        # Each worker runs this same command line as one process sharing the port.
        return supervise(settings, argv)
    from sisyphus.server.app import run  # imported here: publish/grant don't need the server

    try:
        run(settings)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            reason = f"can't listen on {settings.host}:{settings.port}: {reason}"
        print(f"sisyphus serve: {reason}", file=sys.stderr)
        return 1
    return 0
