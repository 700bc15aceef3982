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
    held = _held_events(args.db)
    if held:
        print(
            f"{held} gateway-wide event(s) held for the first chain (written before its first "
            "record; docs/events.md)"
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


def _held_events(db: Path) -> int:
    """How many gateway-wide events wait for the first chain (0 if the table is not there)."""
    from gateway.store import Reader

    with Reader(db) as r:
        try:
            return int(r.conn.execute("SELECT count(*) FROM held_events").fetchone()[0])
        except sqlite3.OperationalError:  # a journal from before migration 5
            return 0


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
    from gateway.ledger import Ledger, in_use
    from gateway.reads import ReadPool

    if in_use(args.db):  # the daemon holds the journal: it makes the archives
        return _archive_through_daemon(args)
    signer = load_signer(args.key or _default_key(args.db))
    root = args.out or args.db.parent / "archives"

    async def run() -> int:
        try:
            ledger = await Ledger.open(args.db, signer)
        except StorageError as exc:
            print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
            return EXIT_FAIL
        reads = ReadPool(args.db)
        try:
            if ledger.halted is not None:
                print(f"error: signing is halted: {ledger.halted}", file=sys.stderr)
                return EXIT_FAIL
            archiver = Archiver(ledger, reads, root, PERIODS[args.period], clock_ms=_now_ms)
            run = await archiver.run(args.chain)
        finally:
            reads.close()
            await ledger.close()
        for rec in run.made:
            p = rec.payload
            print(
                f"{root / p['archive']}: {p['records']} records, {p['closing']['type']} "
                f"{p['closing']['number']}, recorded as {rec.chain} seq {rec.seq}"
            )
        for _, why in run.skipped:
            print(f"skipped: {why}")
        for t, why in run.failed:
            print(f"error: {t.chain} {t.kind} {t.number}: {why}", file=sys.stderr)
        if run.failed:
            return EXIT_FAIL
        if not run.made and not run.skipped:
            print(f"nothing to archive: every {args.period} closing has its archive")
        return EXIT_OK

    return asyncio.run(run())


#: Seconds to wait for the daemon's answer (a year's archive is written and checked first).
ARCHIVE_TIMEOUT_S = 900.0


def _archive_through_daemon(args: argparse.Namespace) -> int:
    """Ask the running daemon for the archives (``POST /v1/admin/archive``, docs/operations.md).

    Its address and admin token come from ``--url`` / ``--token-file``, else from the
    daemon's ``--config`` (``http.listen``, ``http.admin_token_file``).
    """
    import urllib.error
    import urllib.request

    body: dict[str, str] = {"period": args.period}
    if args.chain is not None:
        body["chain"] = args.chain
    how = (
        f"the daemon is running and holds {args.db}: it makes the archive itself. Give this "
        "command its --config (or --url and --token-file), or ask it directly:\n"
        '  curl -X POST -H "Authorization: Bearer $(cat TOKEN_FILE)" '
        f"-d '{json.dumps(body)}' http://127.0.0.1:8480/v1/admin/archive"
    )
    if args.out is not None:
        print(
            "error: --out: the running daemon archives into its journal.archive_dir; "
            "leave --out out, or stop the daemon to archive elsewhere",
            file=sys.stderr,
        )
        return EXIT_USAGE
    url, token_file = args.url, args.token_file
    if args.config is not None:
        from gateway.config import load_config

        cfg = load_config(args.config)
        if url is None and cfg.http.listen:
            url = f"http://{cfg.http.listen}"
        if token_file is None and cfg.http.admin_token_file:
            token_file = cfg.path(cfg.http.admin_token_file)
    if url is None or token_file is None:
        print(f"error: {how}", file=sys.stderr)
        return EXIT_FAIL
    try:
        token = Path(token_file).read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: cannot read the admin token file: {exc}", file=sys.stderr)
        return EXIT_FAIL
    if not url.startswith(("http://", "https://")):
        print(f"error: --url: {url!r} is not an http:// or https:// address", file=sys.stderr)
        return EXIT_USAGE
    request = urllib.request.Request(  # noqa: S310 (the scheme is checked above)
        url.rstrip("/") + "/v1/admin/archive",
        data=json.dumps(body).encode("utf-8"),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=ARCHIVE_TIMEOUT_S) as resp:  # noqa: S310
            status, reply = resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        status = exc.code
        try:
            reply = json.loads(exc.read())
        except ValueError:
            reply = {"error": {"code": f"HTTP_{exc.code}", "message": exc.reason}}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"error: the daemon's admin API at {url} did not answer: {exc}", file=sys.stderr)
        return EXIT_FAIL
    for a in reply.get("archives", []):
        c = a["closing"]
        print(
            f"{a['path']}: {a['records']} records, {c['type']} {c['number']}, "
            f"recorded as {a['chain']} seq {a['recorded_seq']} (by the running daemon)"
        )
    for sk in reply.get("skipped", []):
        print(f"skipped: {sk['reason']}")
    err = reply.get("error")
    if status == 409 and err and err.get("code") == "CONFLICT":
        if not reply.get("skipped"):
            print(err["message"])
        return EXIT_OK
    if err:
        print(f"error: {err.get('code')}: {err.get('message')}", file=sys.stderr)
        for d in err.get("details", []):
            print(f"  {d.get('field')}: {d.get('message')}", file=sys.stderr)
        for f in reply.get("failed", []):
            print(f"  {f['chain']} {f['closing']['type']}: {f['error']}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


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
            announced = bool(probe.heads()) or probe.held_key_id() == new.key_id
            return probe.halted is None and announced
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
        if not records:
            print(
                f"no chain yet: key {new.key_id} replaces {old.key_id}, which signed nothing; "
                "a KEY_GENERATED event saying so is held for the first chain"
            )
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


def cmd_mqtt_acl(args: argparse.Namespace) -> int:
    """Render the Mosquitto acl_file from [mqtt.acl] (gateway.core.mqtt_acl; docs/mqtt.md)."""
    from gateway.config import load_config
    from gateway.core.mqtt_acl import TillAcl, render_mosquitto_acl
    from gateway.core.mqtt_topics import Topics

    cfg = load_config(args.config)
    acl = TillAcl(cfg.mqtt.acl)
    if not acl.configured:
        print(f"error: {args.config} has no [mqtt.acl] table: nothing to render", file=sys.stderr)
        return EXIT_FAIL
    gateway_user = args.gateway_user or cfg.mqtt.username
    if not gateway_user:
        print(
            "error: the gateway's own broker account is needed: set mqtt.username "
            "(or --gateway-user, e.g. a certificate's name with use_identity_as_username)",
            file=sys.stderr,
        )
        return EXIT_FAIL
    if gateway_user in dict(acl.entries):
        print(f"error: {gateway_user!r} is also a till account in [mqtt.acl]", file=sys.stderr)
        return EXIT_FAIL
    acl_path = args.out.resolve() if args.out else Path("/etc/mosquitto/fiscal-gateway.acl")
    users = [gateway_user, *(u for u, _ in acl.entries)]
    notes = [
        "",
        "mosquitto.conf:",
        "  allow_anonymous false",
        f"  password_file {args.password_file}",
        f"  acl_file {acl_path}",
        "one password per account (add -c to the first to create the file; the gateway's",
        "password also goes in the file named by mqtt.password_file):",
        *(f"  mosquitto_passwd {args.password_file} {u}" for u in users),
        "then reload Mosquitto (systemctl reload mosquitto, or SIGHUP) and the gateway (SIGHUP).",
    ]
    text = render_mosquitto_acl(
        Topics(cfg.mqtt.prefix, cfg.gateway.id),
        gateway_user,
        acl,
        source=str(args.config),
        notes=notes,
    )
    if args.out is None:
        sys.stdout.write(text)
    else:
        tmp = args.out.with_name(args.out.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, args.out)
        print(
            f"wrote {args.out}: {len(acl.entries)} till account(s), {len(acl.tills)} till(s)",
            file=sys.stderr,
        )
    print("\n".join(notes[1:]), file=sys.stderr)
    return EXIT_OK


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
        "(while the daemon runs, it is asked to do it through its admin API)",
    )
    a.add_argument("--db", type=Path, required=True)
    a.add_argument("--key", type=Path, default=None)
    a.add_argument("--out", type=Path, default=None, help="default: <db dir>/archives")
    a.add_argument("--period", choices=("MONTHLY", "YEARLY"), default="MONTHLY")
    a.add_argument("--chain", default=None)
    a.add_argument(
        "--config",
        type=Path,
        default=None,
        help="the running daemon's config: where its admin API listens, its token file",
    )
    a.add_argument(
        "--url", default=None, help="the running daemon's HTTP address (http://HOST:PORT)"
    )
    a.add_argument("--token-file", type=Path, default=None, help="the admin token's file")
    a.set_defaults(func=cmd_archive)

    r = sub.add_parser(
        "rotate-key",
        help="announce a new key in every chain and switch to it (stop the daemon first)",
    )
    r.add_argument("--db", type=Path, required=True)
    r.add_argument("--key", type=Path, default=None)
    r.add_argument("--new-key", type=Path, default=None)
    r.set_defaults(func=cmd_rotate_key)

    ma = sub.add_parser(
        "mqtt-acl",
        help="write the Mosquitto acl_file for [mqtt.acl] (which broker account may send "
        "requests for which till) and say how to plug it into mosquitto.conf",
    )
    ma.add_argument("--config", type=Path, required=True, help="the gateway's TOML config")
    ma.add_argument("--out", type=Path, default=None, help="file to write (default: stdout)")
    ma.add_argument(
        "--gateway-user",
        default=None,
        help="the gateway's broker account (default: mqtt.username)",
    )
    ma.add_argument(
        "--password-file",
        default="/etc/mosquitto/passwords",
        help="Mosquitto's password_file, for the instructions (default %(default)s)",
    )
    ma.set_defaults(func=cmd_mqtt_acl)

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
