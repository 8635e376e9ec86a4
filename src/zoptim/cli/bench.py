"""`zoptim bench` (not yet implemented)."""


def register(sub) -> None:
    p = sub.add_parser("bench", help="not yet implemented")
    p.set_defaults(run=lambda args: (_ for _ in ()).throw(SystemExit("zoptim bench: not yet implemented")))
