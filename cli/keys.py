"""agentwatch key generate | policy sign/verify | log verify.

Signing keys, signatures of policy and prompt files, and checking a run's
tamper-evident log. The logic is agentwatch/integrity.py; this is its front
end. Failures a user causes (a missing key, an existing key file) raise
IntegrityError, which cli/main.py prints on one line; a file or log that does
not verify is the command's answer, printed on stdout with exit status 1.
"""
import os

import click

from agentwatch import integrity, state
from agentwatch.integrity import IntegrityError

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
    kid, key_path, pub_path = integrity.generate_key(directory or integrity.keys_dir(), name, force)
    click.echo(kid)
    click.echo(f"wrote {key_path} (private, mode 0600) and {pub_path} "
               f"(public: copy it into {integrity.trusted_dir()} wherever files are verified)", err=True)


@click.command("sign")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--key", "key_file", type=click.Path(dir_okay=False), metavar="KEYFILE",
              help="Private key (default: $AGENTWATCH_STATE_DIR/keys/signing.key).")
def policy_sign(files, key_file):
    """Sign policy or prompt files: writes FILE.sig next to each."""
    key = integrity.load_private_key(key_file or os.path.join(integrity.keys_dir(), "signing.key"))
    for path in files:
        sig = integrity.sign_file(path, key)
        click.echo(f"{path}.sig: signed by {sig['signer']}")


@click.command("verify")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@trust_option
@click.option("--signer", metavar="KEY_ID", help="Also require this signer (ed25519:...).")
@click.pass_context
def policy_verify(ctx, files, trust, signer):
    """Check that files are signed by a trusted key and unchanged since."""
    trusted = integrity.trusted_keys(trust)
    failed = False
    for path in files:
        info = integrity.verify_file(path, trusted, signer)
        click.echo(f"{path}: {info.reason}")
        failed |= not info.ok
    if failed:
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
    run_id = None
    if os.path.isfile(target):
        path = target
    else:
        rec = state.find_run(target)
        if rec is None:
            raise IntegrityError(f"{target}: no such file, and no single run has this id or prefix "
                                 "(agentwatch ps --all lists runs)")
        run_id = rec["run_id"]
        path = state.run_path(run_id, "events.jsonl")
    report = integrity.verify_log(path, integrity.trusted_keys(trust, include_host=True), run_id=run_id)
    if report.ok:
        click.echo(f"OK: {report.lines} events, chain intact, sealed by {report.signer}")
        return
    for line, message in report.located():
        click.echo(f"{path}:{line}: {message}" if line else f"{path}: {message}")
    ctx.exit(1)
