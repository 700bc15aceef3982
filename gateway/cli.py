"""Command line: ``fiscal-gateway <command>`` (see ``fiscal-gateway --help``).

Exit codes: 0 success; 1 verification failed / operation failed; 2 usage; 78 bad config.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
from pathlib import Path

from gateway import __version__
from gateway.core.errors import GatewayError, StorageError

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78

DEFAULT_STATE_DIR = Path("state")


def _default_key(db: Path) -> Path:
    return db.parent / "keys" / "signing.pem"


def cmd_keygen(args: argparse.Namespace) -> int:
    from drivers.signers.software import generate_key

    signer = generate_key(args.out, args.pub)
    pub = args.pub or args.out.with_suffix(".pub.pem")
    print(f"key id {signer.key_id}\nprivate key {args.out} (mode 0600)\npublic key {pub}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from gateway.audit import verify_db

    report = verify_db(args.db)
    for c in report.chains:
        if c.failure is None:
            print(
                f"chain {c.chain}: OK, {c.records} records, head seq {c.head_seq}, "
                f"{c.closings} closings"
            )
        else:
            f = c.failure
            where = f" {f.field}" if f.field else ""
            print(f"chain {c.chain}: FAILED at seq {f.seq}{where}: {f.reason}: {f.message}")
    print(
        f"verified {report.records} records in {report.seconds:.2f} s "
        f"({report.records_per_s:,.0f} records/s): {'OK' if report.ok else 'FAILED'}"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "ok": report.ok,
                    "records": report.records,
                    "failures": [c.failure.to_json() for c in report.chains if c.failure],
                }
            )
        )
    return EXIT_OK if report.ok else EXIT_FAIL


def cmd_export(args: argparse.Namespace) -> int:
    from drivers.signers.software import load_signer
    from gateway.export import export

    if (args.from_seq is not None or args.to_seq is not None) and args.chain is None:
        print("error: --from/--to need --chain", file=sys.stderr)
        return EXIT_USAGE
    signer = load_signer(args.key or _default_key(args.db))
    s = export(
        args.db, args.out, signer, chain=args.chain, from_seq=args.from_seq, to_seq=args.to_seq
    )
    print(
        f"exported {s.records} records of {s.chains} chain(s) to {s.out_dir} "
        f"in {s.seconds:.2f} s; manifest signed by key {signer.key_id}"
    )
    _spool_event(
        args.db,
        "EXPORT_MADE",
        out=str(args.out.resolve()),
        records=s.records,
        chain=args.chain,
        from_seq=args.from_seq,
        to_seq=args.to_seq,
        manifest_hash=s.manifest_hash,
    )
    return EXIT_OK


def _spool_event(db: Path, code: str, **fields: object) -> None:
    """Leave a technical event for the daemon to sign (docs/events.md, "The spool")."""
    from gateway.events import spool_event

    chain = fields.pop("chain", None)
    try:
        spool_event(
            db.parent / "events", code, chain=chain if isinstance(chain, str) else None, **fields
        )
    except OSError as exc:
        print(f"warning: event {code} not spooled for the journal: {exc}", file=sys.stderr)


def cmd_verify_export(args: argparse.Namespace) -> int:
    from gateway.export import ExportInvalid, verify_export

    try:
        r = verify_export(args.dir)
    except ExportInvalid as exc:
        print(f"export INVALID: {exc.message}")
        return EXIT_FAIL
    rate = r.records / r.seconds if r.seconds > 0 else 0.0
    print(
        f"export OK: {r.records} records in {r.chains} chain(s), keys {', '.join(r.key_ids)}; "
        f"{r.closings} closings; {r.seconds:.2f} s ({rate:,.0f} records/s)"
    )
    for chain, seq, why in r.unchecked:
        print(f"  note: closing {chain} seq {seq} checked in part only: {why}")
    if r.archive is not None:
        c = r.archive["closing"]
        p = r.archive["period"]
        print(
            f"archive of {r.archive['chain']} {c['type']} {c['number']} (seq {c['seq']}): "
            f"{p['from_time']} .. {p['to_time']}, manifest {r.manifest_hash}"
        )
    if args.db is not None:
        from gateway.archive import find_recorded
        from gateway.store import Reader

        chains = [r.archive["chain"]] if r.archive is not None else []
        with Reader(args.db) as reader:
            found = [b for b in (find_recorded(reader, c, r.manifest_hash) for c in chains) if b]
        if not found:
            print(f"export INVALID: {args.db} records no archive with manifest {r.manifest_hash}")
            return EXIT_FAIL
        print(f"recorded in the journal as {found[0]['chain']} seq {found[0]['seq']}")
    return EXIT_OK


def cmd_archive(args: argparse.Namespace) -> int:
    from drivers.signers.software import load_signer
    from gateway.archive import PERIODS, Archiver
    from gateway.ledger import Ledger
    from gateway.reads import ReadPool

    signer = load_signer(args.key or _default_key(args.db))
    root = args.out or args.db.parent / "archives"

    async def run() -> int:
        try:
            ledger = await Ledger.open(args.db, signer)
        except StorageError as exc:
            print(
                f"error: {exc.code}: {exc.message} (a running daemon archives on its own "
                "schedule, journal.archive_period; stop it to archive by hand)",
                file=sys.stderr,
            )
            return EXIT_FAIL
        reads = ReadPool(args.db)
        try:
            if ledger.halted is not None:
                print(f"error: signing is halted: {ledger.halted}", file=sys.stderr)
                return EXIT_FAIL
            archiver = Archiver(ledger, reads, root, PERIODS[args.period], clock_ms=_now_ms)
            made = await archiver.run_due(args.chain)
        finally:
            reads.close()
            await ledger.close()
        for rec in made:
            p = rec.payload
            print(
                f"{root / p['archive']}: {p['records']} records, {p['closing']['type']} "
                f"{p['closing']['number']}, recorded as {rec.chain} seq {rec.seq}"
            )
        if not made:
            print(f"nothing to archive: every {args.period} closing has its archive")
        return EXIT_OK

    return asyncio.run(run())


def _now_ms() -> int:
    import time

    return time.time_ns() // 1_000_000


def cmd_rotate_key(args: argparse.Namespace) -> int:
    from drivers.signers.software import generate_key, load_signer
    from gateway.export import fsync_dir
    from gateway.ledger import Ledger

    key_path = args.key or _default_key(args.db)
    old = load_signer(key_path)
    new_path = args.new_key or key_path.with_name(key_path.name + ".new")
    resuming = new_path.exists()  # a key left by an earlier run that may have been cut short
    new = load_signer(new_path) if resuming else generate_key(new_path)

    async def already_announced() -> bool:
        """The journal committed the rotation to ``new`` but the key files were not switched."""
        probe = await Ledger.open(args.db, new)
        try:
            return probe.halted is None and bool(probe.heads())
        finally:
            await probe.close()

    async def rotate() -> int:
        ledger = await Ledger.open(args.db, old)
        try:
            halted = ledger.halted
            records = [] if halted else await ledger.rotate_key(new)
        finally:
            await ledger.close()
        if halted:
            if resuming and await already_announced():
                print(f"the journal already announces key {new.key_id}; switching key files")
                return EXIT_OK
            print(f"error: signing is halted: {halted}", file=sys.stderr)
            return EXIT_FAIL
        for r in records:
            print(f"chain {r.chain}: seq {r.seq} announces key {new.key_id}")
        return EXIT_OK

    rc = asyncio.run(rotate())
    if rc == EXIT_OK:
        retired = key_path.with_name(f"{key_path.name}.retired-{old.key_id}")
        os.replace(key_path, retired)
        os.replace(new_path, key_path)
        pub_new = new_path.with_suffix(".pub.pem")
        if pub_new.exists():
            os.replace(pub_new, key_path.with_suffix(".pub.pem"))
        fsync_dir(key_path.parent)  # the journal already expects the new key: make it stick
        print(f"key {new.key_id} is now {key_path}; old key kept as {retired}")
    return rc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fiscal-gateway", description=__doc__)
    p.add_argument("--version", action="version", version=f"fiscal-gateway {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    k = sub.add_parser("keygen", help="create a signing key (private 0600 + public PEM)")
    k.add_argument("--out", type=Path, default=DEFAULT_STATE_DIR / "keys" / "signing.pem")
    k.add_argument("--pub", type=Path, default=None)
    k.set_defaults(func=cmd_keygen)

    v = sub.add_parser("verify", help="verify every chain of a database (exit 0 only if all OK)")
    v.add_argument("--db", type=Path, required=True)
    v.add_argument("--json", action="store_true", help="also print a JSON summary line")
    v.set_defaults(func=cmd_verify)

    e = sub.add_parser("export", help="write a signed auditor export")
    e.add_argument("--db", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument(
        "--key",
        type=Path,
        default=None,
        help="key that signs the manifest (default: <db dir>/keys/signing.pem)",
    )
    e.add_argument("--chain", default=None)
    e.add_argument("--from", dest="from_seq", type=int, default=None)
    e.add_argument("--to", dest="to_seq", type=int, default=None)
    e.set_defaults(func=cmd_export)

    ve = sub.add_parser("verify-export", help="check an export with its own files only")
    ve.add_argument("dir", type=Path)
    ve.add_argument(
        "--db",
        type=Path,
        default=None,
        help="also check that this journal records the archive (its EXPORT::RECORDS record)",
    )
    ve.set_defaults(func=cmd_verify_export)

    a = sub.add_parser(
        "archive",
        help="archive every closed period not archived yet and record each in its chain "
        "(stop the daemon first: it archives on its own schedule)",
    )
    a.add_argument("--db", type=Path, required=True)
    a.add_argument("--key", type=Path, default=None)
    a.add_argument("--out", type=Path, default=None, help="default: <db dir>/archives")
    a.add_argument("--period", choices=("MONTHLY", "YEARLY"), default="MONTHLY")
    a.add_argument("--chain", default=None)
    a.set_defaults(func=cmd_archive)

    r = sub.add_parser(
        "rotate-key",
        help="announce a new key in every chain and switch to it (stop the daemon first)",
    )
    r.add_argument("--db", type=Path, required=True)
    r.add_argument("--key", type=Path, default=None)
    r.add_argument("--new-key", type=Path, default=None)
    r.set_defaults(func=cmd_rotate_key)

    try:
        from gateway.app import add_print_test_parser, add_run_parser
    except ImportError:
        pass
    else:
        add_run_parser(sub)
        add_print_test_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.func(args)
    except GatewayError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG if exc.code == "CONFIG_ERROR" else EXIT_FAIL
    except sqlite3.Error as exc:  # e.g. a damaged file found while reading: say so, no traceback
        print(f"error: STORAGE_ERROR: cannot read the database: {exc}", file=sys.stderr)
        return EXIT_FAIL
    return rc


if __name__ == "__main__":
    sys.exit(main())
