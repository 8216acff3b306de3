"""The `sftpvault` command: serve, init, user management and break-glass tools.

Every command takes the state directory from --home (env SFTPVAULT_HOME,
default: the current directory). Errors print one line on stderr and exit 1.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from sftpvault import __version__, config, lifecycle
from sftpvault.app import App, build
from sftpvault.errors import IntegrityError, SftpvaultError, UserError
from sftpvault.fsutil import private_dir
from sftpvault.vfs.fs import UserFS
from sftpvault.vfs.openfile import OpenMode, remove_stale_uploads

log = logging.getLogger("sftpvault")
COPY_BLOCK = 1024 * 1024


class Group(click.Group):
    """Turns our errors into one readable line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except IntegrityError as exc:
            raise click.ClickException(f"integrity check failed: {exc}") from None
        except SftpvaultError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            raise click.ClickException(f"{exc.strerror or exc}{where}") from None


def _app(ctx: click.Context) -> App:
    return ctx.ensure_object(dict).setdefault("app", build(config.load(ctx.obj["home"])))


@click.group(cls=Group)
@click.version_option(__version__, prog_name="sftpvault")
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="SFTPVAULT_HOME",
    default=".",
    show_default=True,
    help="State directory (config, keys/, data/). Env: SFTPVAULT_HOME.",
)
@click.pass_context
def main(ctx: click.Context, home: Path) -> None:
    """sftpvault: an SFTP server that stores every file encrypted at rest."""
    ctx.ensure_object(dict)["home"] = home


def _setup_logging(settings: config.Settings) -> None:
    handler: logging.Handler = (
        logging.FileHandler(settings.log.file) if settings.log.file else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log.level.upper())
    logging.getLogger("paramiko").setLevel(logging.WARNING)


@main.command()
@click.option("--host", help="Listen address (default from config: 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), help="Listen port (default from config: 2222).")
@click.option("--workers", type=click.IntRange(0, 256), help="Server processes (config default 0: one per core).")
@click.pass_context
def serve(ctx: click.Context, host: str | None, port: int | None, workers: int | None) -> None:
    """Run the SFTP server (creates host keys and the keystore on first run)."""
    from sftpvault.ssh.hostkeys import ensure_host_keys
    from sftpvault.ssh.server import SSHServer, tcp_socket
    from sftpvault.ssh.workers import limit_malloc_arenas, serve_workers

    settings = config.load(ctx.obj["home"])
    settings.server.host = host or settings.server.host
    settings.server.port = port or settings.server.port
    count = workers if workers is not None else settings.server.workers
    count = count or len(os.sched_getaffinity(0))  # the CPUs we may use (a container's cpuset), not the host's
    settings.server.max_connections = -(-settings.server.max_connections // count)  # the cap is spread over workers
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a core dump would hold plaintext and keys
    limit_malloc_arenas()  # before any thread; workers inherit it
    _setup_logging(settings)
    try:
        # no SO_REUSEPORT here: a port held by anyone, even another sftpvault, is refused
        tcp_socket(settings.server.host, settings.server.port).close()
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {settings.server.host}:{settings.server.port}: {exc.strerror}"
        ) from None
    app = build(settings, actor="server")
    ensure_host_keys(settings.keys_dir)
    for warning in app.key_service.startup():
        log.warning("%s", warning)
    stale = remove_stale_uploads(private_dir(settings.data_dir))
    if stale:
        log.info("removed %d unfinished upload(s) left by an earlier run", stale)
    if count > 1:
        # each worker builds its own App: no HTTP connection or lock is shared across the fork
        serve_workers(
            lambda: SSHServer(build(settings, actor="server")),
            settings.server.host,
            settings.server.port,
            count,
            pin=settings.server.pin_workers,
        )
        return
    server = SSHServer(app)
    bound_host, bound_port = server.bind()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop())
    log.info("sftpvault %s listening on %s:%d", __version__, bound_host, bound_port)
    server.serve_forever()


@main.command()
@click.option("--force", is_flag=True, help="Overwrite an existing sftpvault.toml.")
@click.pass_context
def init(ctx: click.Context, force: bool) -> None:
    """Write a commented default sftpvault.toml."""
    home: Path = ctx.obj["home"]
    path = home / config.CONFIG_NAME
    if path.exists() and not force:
        raise click.ClickException(f"{path} exists (use --force to overwrite)")
    home.mkdir(parents=True, exist_ok=True)
    path.write_text(config.DEFAULT_CONFIG)
    click.echo(f"wrote {path}")


# -- users ------------------------------------------------------------------------


@main.group(cls=Group)
def user() -> None:
    """Manage the embedded user store."""


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not password.strip() or "\x00" in password:
        raise UserError("the password is empty")
    return password


def _key_lines(files: tuple[Path, ...]) -> list[str]:
    lines = []
    for path in files:
        lines += [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return lines


@user.command("add")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
@click.option(
    "--authorized-key",
    "key_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="OpenSSH public key file.",
)
@click.pass_context
def user_add(ctx: click.Context, name: str, password_stdin: bool, key_files: tuple[Path, ...]) -> None:
    """Create a user with a password and/or SSH public keys."""
    keys = _key_lines(key_files)
    password = _read_password(password_stdin) if password_stdin or not keys else None
    app = _app(ctx)
    app.users.add(name, password, keys)
    app.user_home(name)
    click.echo(f"added user {name}")


@user.command("list")
@click.pass_context
def user_list(ctx: click.Context) -> None:
    """List users and how they may log in."""
    for name, record in sorted(_app(ctx).users.list().items()):
        methods = (["password"] if record.get("password") else []) + [f"{len(record['keys'])} key(s)"]
        click.echo(f"{name}\t{', '.join(methods)}")


@user.command("remove")
@click.argument("name")
@click.pass_context
def user_remove(ctx: click.Context, name: str) -> None:
    """Remove a user's login (their encrypted files and DEK record stay)."""
    _app(ctx).users.remove(name)
    click.echo(f"removed user {name}; data and keys kept")


@user.command("set-password")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
@click.pass_context
def user_set_password(ctx: click.Context, name: str, password_stdin: bool) -> None:
    """Set or change a user's password."""
    app = _app(ctx)
    if not app.users.exists(name):
        raise UserError(f"no such user {name!r}")
    app.users.set_password(name, _read_password(password_stdin))
    click.echo(f"password of {name} changed")


@user.command("add-key")
@click.argument("name")
@click.argument("key_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_context
def user_add_key(ctx: click.Context, name: str, key_file: Path) -> None:
    """Authorize the OpenSSH public key(s) in KEY_FILE for NAME."""
    app = _app(ctx)
    for line in _key_lines((key_file,)):
        app.users.add_key(name, line)
    click.echo(f"key(s) added for {name}")


# -- key lifecycle ------------------------------------------------------------------


def _report(outcome: lifecycle.Outcome, what: str) -> None:
    for failure in outcome.failed:
        click.echo(f"FAILED {failure}", err=True)
    click.echo(f"{what}: {outcome.done} done, {len(outcome.failed)} failed")
    if outcome.failed:
        raise click.exceptions.Exit(1)


@main.group(cls=Group)
def kek() -> None:
    """Key-encryption keys: status, rotation, rewrapping, migration."""


@kek.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def kek_status(ctx: click.Context, as_json: bool) -> None:
    """Show the KEK in use and how many DEK records sit on each version."""
    status = lifecycle.kek_status(_app(ctx))
    if as_json:
        click.echo(json.dumps(status, indent=1))
        return
    click.echo(f"service {status['service']}  key {status['key']}  latest version {status['latest_version']}")
    click.echo("service\tversion\tDEKs")
    for row in status["deks"]:
        click.echo(f"{row['service']}\t{row['kek_version']}\t{row['count']}")


@kek.command("rotate")
@click.option(
    "--min-decryption-version",
    "raise_floor",
    is_flag=True,
    help="Afterwards refuse older versions (Transit), once every DEK is rewrapped.",
)
@click.pass_context
def kek_rotate(ctx: click.Context, raise_floor: bool) -> None:
    """Create a new KEK version and rewrap every DEK record to it (safe while serving)."""
    app = _app(ctx)
    with click.progressbar(length=len(app.keyring.users()), label="rewrapping DEKs", file=sys.stderr) as bar:
        version, outcome = lifecycle.rotate_kek(app, bar.update, raise_floor)
    click.echo(f"KEK {app.keyring.service.kek_name} is now at version {version}")
    _report(outcome, "rewrapped")


@kek.command("rewrap")
@click.pass_context
def kek_rewrap(ctx: click.Context) -> None:
    """Rewrap DEK records still on older KEK versions (finishes an interrupted rotate)."""
    app = _app(ctx)
    with click.progressbar(length=lifecycle.count_stale(app), label="rewrapping DEKs", file=sys.stderr) as bar:
        outcome = lifecycle.rewrap_all(app, bar.update)
    _report(outcome, "rewrapped")


@kek.command("migrate")
@click.option("--to", "target", required=True, type=click.Choice(config.SERVICES), help="Target key service.")
@click.pass_context
def kek_migrate(ctx: click.Context, target: str) -> None:
    """Move every DEK record to another configured key service."""
    app = _app(ctx)
    with click.progressbar(length=len(app.keyring.users()), label=f"migrating to {target}", file=sys.stderr) as bar:
        outcome = lifecycle.migrate(app, target, bar.update)
    if app.settings.keys.service != target:
        click.echo(f'set keys.service = "{target}" in sftpvault.toml so new DEKs use it too', err=True)
    _report(outcome, "migrated")


@main.group(cls=Group)
def dek() -> None:
    """Per-user data-encryption keys."""


@dek.command("rotate")
@click.argument("name", required=False)
@click.option("--all", "every", is_flag=True, help="Rotate the DEK of every user.")
@click.option("--reencrypt", is_flag=True, help="Also re-encrypt every chunk (for a suspected compromise).")
@click.pass_context
def dek_rotate(ctx: click.Context, name: str | None, every: bool, reencrypt: bool) -> None:
    """Give NAME (or --all users) a new DEK and move every file under it."""
    if bool(name) == every:
        raise click.UsageError("name one user or give --all")
    app = _app(ctx)
    total = lifecycle.Outcome()
    for user_name in app.keyring.users() if every else [name]:
        with click.progressbar(
            length=lifecycle.count_files(app, user_name), label=f"rotating DEK of {user_name}", file=sys.stderr
        ) as bar:
            outcome = lifecycle.rotate_dek(app, user_name, reencrypt, bar.update)
        total.done += outcome.done
        total.failed += [f"{user_name}:{f}" for f in outcome.failed]
    _report(total, "files moved to the new DEK")


# -- break-glass tools ------------------------------------------------------------------


@contextmanager
def _user_fs(app: App, name: str, create: bool = False) -> Iterator[UserFS]:
    """A user's file system with their DEKs, for admin tools; released afterwards."""
    if not create and app.keyring.load_record(name) is None:
        raise UserError(f"user {name!r} has no encrypted data (no DEK record)")
    keys = app.keyring.acquire(name)
    fs = app.user_fs(name, keys)
    try:
        yield fs
    finally:
        fs.close()
        app.keyring.release(name)


@main.command("cat")
@click.argument("name")
@click.argument("path")
@click.pass_context
def cat(ctx: click.Context, name: str, path: str) -> None:
    """Decrypt one stored file of user NAME to stdout."""
    with _user_fs(_app(ctx), name) as fs:
        handle = fs.open(path, OpenMode(read=True))
        out = click.get_binary_stream("stdout")
        try:
            offset = 0
            while data := handle.read(offset, COPY_BLOCK):
                out.write(data)
                offset += len(data)
        finally:
            handle.close()


@main.command("import")
@click.argument("name")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("dest", default="/")
@click.pass_context
def import_tree(ctx: click.Context, name: str, src: Path, dest: str) -> None:
    """Encrypt the plaintext tree SRC into user NAME's area at DEST."""
    app = _app(ctx)
    if not app.users.exists(name):
        raise UserError(f"no such user {name!r}")
    files = [p for p in sorted(src.rglob("*")) if p.is_file() and not p.is_symlink()]
    with (
        _user_fs(app, name, create=True) as fs,
        click.progressbar(
            length=sum(p.stat().st_size for p in files), label=f"importing into {name}", file=sys.stderr
        ) as bar,
    ):
        for path in files:
            target = dest.rstrip("/") + "/" + path.relative_to(src).as_posix()
            _makedirs(fs, target.rsplit("/", 1)[0])
            handle = fs.open(
                target, OpenMode(write=True, create=True, truncate=True), stat.S_IMODE(path.stat().st_mode)
            )
            try:
                with path.open("rb") as source:
                    offset = 0
                    while data := source.read(COPY_BLOCK):
                        handle.write(offset, data)
                        offset += len(data)
                        bar.update(len(data))
            finally:
                handle.close()
    click.echo(f"imported {len(files)} file(s) into {name}:{dest}")


def _makedirs(fs: UserFS, vpath: str) -> None:
    parts = [p for p in vpath.split("/") if p]
    for depth in range(1, len(parts) + 1):
        try:
            fs.mkdir("/" + "/".join(parts[:depth]))
        except FileExistsError:
            pass


@main.command()
@click.argument("name", required=False)
@click.pass_context
def verify(ctx: click.Context, name: str | None) -> None:
    """Decrypt and authenticate every stored file (of NAME, or of every user)."""
    app = _app(ctx)
    names = [name] if name else sorted(p.name for p in app.settings.data_dir.glob("*") if p.is_dir())
    checked, failed = 0, []
    for user_name in names:
        with _user_fs(app, user_name) as fs:
            for _, _, path in list(fs.walk_files()):
                checked += 1
                try:
                    _read_all(fs, path)
                except (IntegrityError, SftpvaultError, OSError) as exc:
                    failed.append(f"{user_name}:{path}: {exc}")
    for line in failed:
        click.echo(f"FAILED {line}", err=True)
    click.echo(f"verified {checked} file(s) of {len(names)} user(s): {checked - len(failed)} ok, {len(failed)} failed")
    if failed:
        ctx.exit(1)


def _read_all(fs: UserFS, path: str) -> None:
    handle = fs.open(path, OpenMode(read=True))
    try:
        offset = 0
        while data := handle.read(offset, COPY_BLOCK):
            offset += len(data)
    finally:
        handle.close()


if __name__ == "__main__":  # pragma: no cover
    main()
