"""The ``sisyphus`` command: builds settings and calls the package; holds no logic."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from sisyphus import __version__, client, config
from sisyphus.errors import ConfigError


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the service",
        description="Run the service. Every flag also reads a SISYPHUS_* variable.",
    )
    for option in config.OPTIONS:
        default = "none" if option.default is None else option.default
        serve.add_argument(
            option.flag,
            dest=option.name,
            metavar=option.metavar,
            help=f"{option.help} (env {option.env}, default {default})".replace("%", "%%"),
        )


def _target_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("SISYPHUS_URL", client.DEFAULT_URL),
        help="the running service (env SISYPHUS_URL, default %(default)s)",
    )
    parser.add_argument(
        "--redis",
        metavar="URL",
        default=None,
        help="write straight to this Redis instead of calling the service",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("SISYPHUS_API_KEY"),
        help="the service's API key (env SISYPHUS_API_KEY)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sisyphus", description="Push notifications to browsers over Server-Sent Events."
    )
    parser.add_argument("--version", action="version", version=f"sisyphus {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    publish = sub.add_parser("publish", help="publish a message on a channel")
    publish.add_argument("channel", help="e.g. room:918")
    publish.add_argument("data", help="the message; '-' reads it from standard input")
    _target_flags(publish)
    token = sub.add_parser(
        "token",
        help="mint a signed user token",
        description="Print a token that lets USER listen; sign it with SISYPHUS_SECRET.",
    )
    token.add_argument("user", help="the user id (the token's `sub`)")
    token.add_argument(
        "--ttl", type=float, default=3600.0, help="seconds until it expires (default %(default)s)"
    )
    token.add_argument(
        "--secret",
        default=os.environ.get("SISYPHUS_SECRET"),
        help="the HMAC secret (env SISYPHUS_SECRET)",
    )
    token.add_argument("--algorithm", default="HS256", choices=["HS256", "HS384", "HS512"])
    token.add_argument("--audience", default=os.environ.get("SISYPHUS_AUDIENCE"))
    token.add_argument("--issuer", default=os.environ.get("SISYPHUS_ISSUER"))
    position = sub.add_parser(
        "position", help="print the id of now (render it into a page; its stream resumes there)"
    )
    _target_flags(position)
    for verb, text in (("grant", "let a user read channels"), ("revoke", "take channels away")):
        rights = sub.add_parser(verb, help=text)
        rights.add_argument("user", help="the user id")
        rights.add_argument("channels", nargs="+", metavar="CHANNEL")
        _target_flags(rights)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "token":
        return _token(args)
    publisher = client.connect(url=args.url, redis_url=args.redis, api_key=args.api_key)
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
    if not args.secret:
        print("sisyphus token: give --secret or set SISYPHUS_SECRET", file=sys.stderr)
        return 2
    try:
        token = client.mint_token(
            args.secret,
            args.user,
            ttl=args.ttl,
            algorithm=args.algorithm,
            audience=args.audience,
            issuer=args.issuer,
        )
    except ValueError as exc:
        print(f"sisyphus token: {exc}", file=sys.stderr)
        return 1
    print(token)
    return 0


def _serve(args: argparse.Namespace) -> int:
    flags = {option.name: getattr(args, option.name) for option in config.OPTIONS}
    try:
        settings = config.load(flags)
    except ConfigError as exc:
        print(f"sisyphus serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    from sisyphus.server.app import run  # imported here: publish/grant don't need the server

    try:
        run(settings)
    except OSError as exc:
        print(f"sisyphus serve: {exc}", file=sys.stderr)
        return 1
    return 0
