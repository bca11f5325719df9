"""agentwatch key generate | policy sign/verify | log verify.

Signing keys, signatures of policy and prompt files, and checking a run's
tamper-evident log. The logic is agentwatch/integrity.py, through
agentwatch.api; this is its front end. Failures a user causes (a missing key,
an existing key file, an unknown run) raise an agentwatch error, which
cli/main.py prints on one line; a file or log that does not verify is the
command's answer, printed on stdout with exit status 1.
"""
import click

from agentwatch import api

TRUST_HELP = "Also trust this public key (PEM .pub; repeatable). Always trusted: keys/trusted/*.pub."
trust_option = click.option("--trust", "trust", multiple=True, metavar="PUBFILE",
                            type=click.Path(exists=True, dir_okay=False), help=TRUST_HELP)


@click.group("key")
def key_group():
    """Signing keys (Ed25519)."""


@key_group.command("generate")
@click.option("--name", default="signing", show_default=True, help="Writes NAME.key and NAME.pub.")
@click.option("--dir", "directory", type=click.Path(file_okay=False),
              help="Where to write them (default: $AGENTWATCH_STATE_DIR/keys).")
@click.option("--force", is_flag=True, help="Replace an existing key of that name.")
def key_generate(name, directory, force):
    """Make a signing key pair; prints its key id."""
    pair = api.generate_key(directory, name, force)
    click.echo(pair.key_id)
    click.echo(f"wrote {pair.private_path} (private, mode 0600) and {pair.public_path} "
               f"(public: copy it into {api.trusted_dir()} wherever files are verified)", err=True)


@click.command("sign")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--key", "key_file", type=click.Path(dir_okay=False), metavar="KEYFILE",
              help="Private key (default: $AGENTWATCH_STATE_DIR/keys/signing.key).")
def policy_sign(files, key_file):
    """Sign policy or prompt files: writes FILE.sig next to each."""
    for signed in api.sign_files(files, key_file):
        click.echo(f"{signed.sig_path}: signed by {signed.signer}")


@click.command("verify")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@trust_option
@click.option("--signer", metavar="KEY_ID", help="Also require this signer (ed25519:...).")
@click.pass_context
def policy_verify(ctx, files, trust, signer):
    """Check that files are signed by a trusted key and unchanged since."""
    results = api.verify_files(files, trust, signer)
    for r in results:
        click.echo(f"{r.path}: {r.reason}")
    if not all(r.ok for r in results):
        ctx.exit(1)


@click.group("log")
def log_group():
    """Run logs."""


@log_group.command("verify")
@click.argument("target", metavar="RUN_ID|FILE")
@trust_option
@click.pass_context
def log_verify(ctx, target, trust):
    """Check a run log's hash chain and its signed seal.

    RUN_ID (or a unique prefix) names runs/<id>/events.jsonl in the state
    directory; an existing file is read as a log. Seals by this host's key
    (keys/host.pub) are trusted here; for another host's logs, --trust its
    host.pub."""
    report = api.verify_log(target, trust)
    if report.ok:
        click.echo(f"OK: {report.lines} events, chain intact, sealed by {report.signer}")
        return
    path = report.path
    for line, message in report.problems:
        click.echo(f"{path}:{line}: {message}" if line else f"{path}: {message}")
    ctx.exit(1)
