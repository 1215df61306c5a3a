"""`tensorguard-fast info`."""


def register(sub) -> None:
    p = sub.add_parser("info", help="version and which backends are usable here")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from .. import info

    return info.main(["--json"] if args.json else [])
