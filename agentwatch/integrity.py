"""Signatures and tamper-evident run logs (Ed25519, from `cryptography`).

Two questions this module answers:

1. *Is this policy (or prompt) file the one a trusted person approved?*
   ``sign_file`` writes ``FILE.sig`` next to it; ``verify_file`` checks the
   file's bytes against it and the signer against the trusted keys.

2. *Is this run log the one agentwatch wrote?* Every line of a run's
   ``events.jsonl`` carries ``prev``, the SHA-256 of the line before it (the
   first line: of a run-specific start value), so editing, dropping,
   inserting or reordering a line breaks the chain at a precise line. A chain
   alone is only tamper-*evident* against a careless editor: whoever can write
   the file can also recompute every hash after an edit. So the run ends with
   a ``lifecycle``/``seal`` event whose signed ``last`` hash and line count pin
   the whole chain to the host key; rewriting the log then needs that key.

Keys live under ``state_dir()/keys``::

    keys/host.key, host.pub     this machine's log-sealing key (made on first use)
    keys/NAME.key, NAME.pub     keys made by `agentwatch key generate`
    keys/trusted/*.pub          public keys whose signatures are accepted

A key is named by its id, ``ed25519:`` + the first 16 hex digits of the
SHA-256 of its raw 32-byte public key. Trust decisions never rest on the id
alone: a signature is accepted only when the full public key that made it is
one of the trusted keys.

Only pure Python and `cryptography`: this imports without root and without bcc.

One module (~510 lines) for now: keys, signatures and the log chain share
the key format and the canonical encoding; it becomes integrity/ when the
harness adds scope tokens.
"""
import base64
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .core.errors import IntegrityError, PolicyError  # noqa: F401 - IntegrityError: raised here, declared there
from .core.state import state_dir

FILE_CONTEXT = "agentwatch-file-v1\n"   # domain separation: a file signature is never a log seal
LOG_CONTEXT = "agentwatch-log-v1\n"


# ---- keys ------------------------------------------------------------------------

def keys_dir():
    return os.path.join(state_dir(), "keys")


def trusted_dir():
    return os.path.join(keys_dir(), "trusted")


def raw_public(key):
    """The 32 raw bytes of a public key (or of a private key's public half)."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key):
    """'ed25519:' + sha256(raw public key)[:16]; accepts a private or public key or the raw bytes."""
    raw = key if isinstance(key, bytes) else raw_public(key)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def _private_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _public_pem(key):
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def _write_file(path, data, mode, overwrite):
    """Write ``data`` to ``path`` with ``mode``, all at once: readers see no file
    or the whole file, never half a key. Without ``overwrite`` an existing file
    raises FileExistsError (os.link refuses to replace, so two processes
    creating the same key cannot both win)."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        os.fchmod(fd, mode)   # before any byte is written: a private key is never readable by others
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _make_private_dir(directory):
    os.makedirs(directory, mode=0o700, exist_ok=True)


def generate_key(directory, name="signing", force=False):
    """Make an Ed25519 key pair: ``directory/name.key`` (PEM PKCS8, 0600) and
    ``directory/name.pub`` (PEM). Refuses to replace an existing key unless
    ``force``: losing a private key silently would orphan every signature.
    Returns (key id, key path, pub path)."""
    if not name or os.sep in name or name.startswith("."):
        raise IntegrityError(f"key name {name!r} must be a plain file name")
    key_path = os.path.join(directory, name + ".key")
    pub_path = os.path.join(directory, name + ".pub")
    if not force:
        for p in (key_path, pub_path):
            if os.path.exists(p):
                raise IntegrityError(f"{p} already exists; use --force to replace it "
                                     "(files signed with the old key will no longer verify)")
    _make_private_dir(directory)
    key = Ed25519PrivateKey.generate()
    try:
        _write_file(key_path, _private_pem(key), 0o600, overwrite=force)
    except FileExistsError:
        raise IntegrityError(f"{key_path} already exists; use --force to replace it")
    _write_file(pub_path, _public_pem(key), 0o644, overwrite=True)
    return key_id(key), key_path, pub_path


def load_private_key(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise IntegrityError(f"cannot read key {path}: {e.strerror}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise IntegrityError(f"{path}: not an unencrypted PEM private key ({e})")
    if not isinstance(key, Ed25519PrivateKey):
        raise IntegrityError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise IntegrityError(f"cannot read public key {path}: {e.strerror}")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise IntegrityError(f"{path}: not a PEM public key ({e})")
    if not isinstance(key, Ed25519PublicKey):
        raise IntegrityError(f"{path}: not an Ed25519 public key")
    return key


def host_key():
    """This machine's log-sealing key, ``keys/host.key``, made on first use
    (0600 in a 0700 directory) with its public half in ``keys/host.pub``.
    Concurrent first runs agree on one key: the loser of the race loads the
    winner's."""
    directory = keys_dir()
    key_path = os.path.join(directory, "host.key")
    pub_path = os.path.join(directory, "host.pub")
    if os.path.exists(key_path):
        key = load_private_key(key_path)
    else:
        _make_private_dir(directory)
        key = Ed25519PrivateKey.generate()
        try:
            _write_file(key_path, _private_pem(key), 0o600, overwrite=False)
        except FileExistsError:
            key = load_private_key(key_path)
    if not os.path.exists(pub_path):
        _write_file(pub_path, _public_pem(key), 0o644, overwrite=True)
    return key


def trusted_keys(extra=(), include_host=False):
    """{key id: public key} of every ``keys/trusted/*.pub`` plus the files in
    ``extra`` (``--trust``), plus ``keys/host.pub`` when ``include_host`` (log
    verification: the host's own seals are trusted on the host; to verify logs
    elsewhere, copy host.pub into that machine's keys/trusted/). A broken file
    in the trust store is an error, not skipped: a silently ignored key would
    make correctly signed files fail for no visible reason."""
    paths = []
    try:
        paths = [os.path.join(trusted_dir(), n) for n in sorted(os.listdir(trusted_dir()))
                 if n.endswith(".pub")]
    except FileNotFoundError:
        pass
    host_pub = os.path.join(keys_dir(), "host.pub")
    if include_host and os.path.exists(host_pub):
        paths.append(host_pub)
    paths.extend(extra)
    out = {}
    for p in paths:
        key = load_public_key(p)
        out[key_id(key)] = key
    return out


def _verify(public_key, signature, message):
    try:
        public_key.verify(signature, message)
        return True
    except InvalidSignature:
        return False


# ---- file signatures ---------------------------------------------------------------

@dataclass
class SignatureInfo:
    signer: str = None    # key id named by the .sig (None when there is no readable .sig)
    ok: bool = False      # signature valid, signer trusted (and the required one)
    reason: str = ""      # one line: why not, or "signed by ID (trusted)"


def _file_message(sha256_hex):
    return (FILE_CONTEXT + sha256_hex + "\n").encode()


def sign_file(path, key):
    """Write ``path.sig`` for the file's current bytes; returns its contents.
    The signature is over the SHA-256, not the file, so a .sig stays small and
    a verifier reads the file once."""
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    sig = {"version": 1, "file": os.path.basename(path), "sha256": digest,
           "signer": key_id(key), "public_key": base64.b64encode(raw_public(key)).decode(),
           "signature": base64.b64encode(key.sign(_file_message(digest))).decode()}
    _write_file(path + ".sig", (json.dumps(sig, indent=1) + "\n").encode(), 0o644, overwrite=True)
    return sig


def verify_file(path, trusted=None, required_signer=None):
    """Check ``path`` against ``path.sig``. ``trusted``: {key id: public key},
    default ``trusted_keys()``. Never raises for a bad or missing signature
    (the reason says what is wrong); raises IntegrityError only for an
    unreadable trust store. Checks, in order: the .sig exists and parses, the
    file's hash is the signed one, the signature is valid for the embedded
    key, that key is the required signer, and it is trusted."""
    sig_path = path + ".sig"
    if not os.path.exists(sig_path):
        return SignatureInfo(None, False, f"no signature file {sig_path}")
    try:
        with open(sig_path, "rb") as f:
            sig = json.loads(f.read())
        signer = sig["signer"]
        public_raw = base64.b64decode(sig["public_key"], validate=True)
        signature = base64.b64decode(sig["signature"], validate=True)
        signed_hash = sig["sha256"]
        if sig.get("version") != 1:
            return SignatureInfo(signer, False, f"{sig_path}: unsupported version {sig.get('version')!r}")
        public = Ed25519PublicKey.from_public_bytes(public_raw)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return SignatureInfo(None, False, f"{sig_path} is not a valid signature file ({e})")
    try:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        return SignatureInfo(signer, False, f"cannot read {path}: {e.strerror}")
    if digest != signed_hash:
        return SignatureInfo(signer, False, "signature does not match the file (file changed after signing)")
    if key_id(public_raw) != signer:
        return SignatureInfo(signer, False, f"{sig_path}: its public key is not {signer} (signature file altered)")
    if not _verify(public, signature, _file_message(digest)):
        return SignatureInfo(signer, False, f"signature is invalid ({sig_path} was altered)")
    if required_signer and signer != required_signer:
        return SignatureInfo(signer, False, f"signed by {signer} but the policy requires {required_signer}")
    if trusted is None:
        trusted = trusted_keys()
    known = trusted.get(signer)
    if known is None or raw_public(known) != public_raw:
        return SignatureInfo(signer, False, f"signed by {signer} which is not trusted")
    return SignatureInfo(signer, True, f"signed by {signer} (trusted)")


def check_signed(path, require=False, required_signer=None, trusted=None):
    """The runner's gate for a policy or prompt file. When a signature is
    required (``require``, or a ``required_signer`` key id) and the file does
    not verify: PolicyError "FILE: reason". When nothing is required, unsigned
    files are allowed: returns the signer when a valid trusted .sig exists,
    else None (also for a .sig that does not verify; call verify_file to warn
    about that)."""
    if not (require or required_signer):
        if not os.path.exists(path + ".sig"):
            return None
        info = verify_file(path, trusted)
        return info.signer if info.ok else None
    info = verify_file(path, trusted, required_signer)
    if not info.ok:
        raise PolicyError(f"{path}: {info.reason}")
    return info.signer


# ---- hash-chained logs ---------------------------------------------------------------

def _sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


def chain_start(run_id):
    """The ``prev`` of a run's first line. Depends on the run id, so the first
    line of another run's log does not fit here."""
    return _sha256_hex((LOG_CONTEXT + run_id).encode())


class Chain:
    """The running hash of one run's log. The writer, for each event::

        event.prev = chain.prev
        line = event.to_json()          # the exact bytes written, minus "\\n"
        write(line + "\\n")
        chain.advance(line)

    ``lines`` counts the lines written, for the seal."""

    def __init__(self, run_id):
        self.run_id = run_id
        self.prev = chain_start(run_id)
        self.lines = 0

    def advance(self, line):
        self.prev = _sha256_hex(line.encode())
        self.lines += 1


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _seal_message(run_id, events, last, counts):
    return canonical_json({"run_id": run_id, "events": events, "last": last, "counts": counts})


def seal(chain, run_id, counts, key):
    """The ``detail`` of the run's final ``lifecycle``/``seal`` event: how many
    lines came before it, the hash of the last one, the run's counts, all
    signed with the host ``key``. The seal line itself then goes through the
    chain like any other line (its ``prev`` equals ``last``)."""
    if run_id != chain.run_id:
        raise ValueError(f"sealing run {run_id} with the chain of run {chain.run_id}")
    signature = key.sign(_seal_message(run_id, chain.lines, chain.prev, counts))
    return {"events": chain.lines, "last": chain.prev, "counts": counts,
            "host_key": key_id(key), "signature": base64.b64encode(signature).decode()}


def _is_seal(obj):
    return isinstance(obj, dict) and obj.get("kind") == "lifecycle" and obj.get("phase") == "seal"


@dataclass
class LogReport:
    ok: bool = False
    lines: int = 0
    problems: list = field(default_factory=list)   # "line N: ...", "seal: ...", "no seal: ..."
    sealed: bool = False      # the last line is a seal event
    signer: str = None        # host key id, when the seal's signature verified with a trusted key

    def located(self):
        """(line number, message) per problem, for FILE:LINE: output. "line N: "
        problems are at N; seal problems are about the last line."""
        out = []
        for p in self.problems:
            head, _, rest = p.partition(": ")
            if head.startswith("line ") and head[5:].isdigit():
                out.append((int(head[5:]), rest))
            else:
                out.append((self.lines, p))
        return out


def _log_lines(path):
    """The log's lines as raw bytes without their newline, streamed (a log
    can be large): hashes are over the exact bytes the writer wrote."""
    with open(path, "rb") as f:
        for raw in f:
            yield raw[:-1] if raw.endswith(b"\n") else raw


def _parse(raw):
    """A line's JSON object, or None when it is not one."""
    try:
        obj = json.loads(raw)
    except ValueError:       # UnicodeDecodeError included
        return None
    return obj if isinstance(obj, dict) else None


def _first_run_id(path):
    for raw in _log_lines(path):
        obj = _parse(raw)
        if obj and isinstance(obj.get("run_id"), str):
            return obj["run_id"]
    return None


def verify_log(path, trusted=None, run_id=None):
    """Check a run log's chain and seal. ``trusted``: {key id: public key} of
    acceptable host keys, default ``trusted_keys(include_host=True)``.
    ``run_id``: the run this log must belong to (default: the first line's).

    Where a tampering shows (lines 1-based, N lines in all):
    - line i edited: line i+1's prev no longer matches (a line i edited into
      invalid JSON shows at i itself, "not JSON"); the last event edited:
      also "seal: last hash does not match line i" - which still holds when
      the editor fixed the seal's unsigned prev, or rewrote the whole chain.
    - line i dropped, a line inserted at i, lines i and i+1 swapped: line i.
    - the seal dropped (or the log cut short): "no seal: log ends at line N".
    Only the first chain break is reported in full: one edit breaks one link,
    but a log that is garbled throughout would break on every line. Its
    message says how many lines follow and how many further breaks they hold."""
    try:
        if run_id is None:
            run_id = _first_run_id(path)
            if run_id is None:
                if os.path.getsize(path) == 0:
                    return LogReport(False, 0, ["empty log: no events"])
                return LogReport(False, 0, ["line 1: no run_id in the log: "
                                            "cannot compute the start of the chain"])
        n = 0
        expected = chain_start(run_id)   # the prev line n must carry
        before_last = None               # ... and that of the last line
        first_break, more_breaks, next_break = None, 0, None
        early_seals = []
        obj = None
        for raw in _log_lines(path):
            n += 1
            if _is_seal(obj):
                early_seals.append(n - 1)
            obj = _parse(raw)
            if obj is None:
                problem = "not JSON"
            elif obj.get("prev") != expected:
                above = f"line {n - 1}" if n > 1 else f"the start of the chain of run {run_id}"
                problem = (f"prev does not match {above} "
                           "(a line was edited, dropped, inserted or reordered at or before here)")
            else:
                problem = None
            if problem and first_break is None:
                first_break = (n, problem)
            elif problem:
                more_breaks += 1
                next_break = next_break or n
            before_last, expected = expected, _sha256_hex(raw)
    except OSError as e:
        return LogReport(False, 0, [f"cannot read {path}: {e.strerror}"])
    if n == 0:
        return LogReport(False, 0, ["empty log: no events"])

    problems = []
    if first_break:
        line, msg = first_break
        if more_breaks:
            msg += (f"; after it: {_plural(n - line, 'line')}, {_plural(more_breaks, 'more break')}"
                    f" (the next at line {next_break})")
        elif n > line:
            msg += f"; after it: {_plural(n - line, 'line')}, chained correctly"
        problems.append(f"line {line}: {msg}")
    for i in early_seals:
        problems.append(f"line {i}: a seal before the end of the log "
                        "(lines were added after the run was sealed)")
    sealed, signer = _is_seal(obj), None
    if not sealed:
        problems.append(f"no seal: log ends at line {n} (run still running, crashed, or truncated)")
    else:
        seal_problems, signer = _check_seal(obj.get("detail"), run_id, n - 1, before_last, trusted)
        problems.extend(seal_problems)
    return LogReport(not problems, n, problems, sealed, signer)


def _plural(n, word):
    return f"{n} {word}" + ("" if n == 1 else "s")


def _check_seal(detail, run_id, before, before_hash, trusted):
    """Problems of the seal (the last line; ``before`` lines precede it, the
    last of them hashing to ``before_hash``) and its signer when it verified."""
    if not isinstance(detail, dict):
        return ["seal: no detail"], None
    problems = []
    if detail.get("events") != before:
        problems.append(f"seal: says {detail.get('events')} events precede it, "
                        f"the log has {before} (lines were dropped or inserted)")
    if detail.get("last") != before_hash:
        problems.append(f"seal: last hash does not match line {before}" if before else
                        "seal: last hash does not match the start of the chain")
    kid = detail.get("host_key")
    if trusted is None:
        trusted = trusted_keys(include_host=True)
    public = trusted.get(kid) if isinstance(kid, str) else None
    if public is None:
        problems.append(f"seal: signed by {kid}, not a trusted host key")
        return problems, None
    try:
        signature = base64.b64decode(detail.get("signature") or "", validate=True)
        message = _seal_message(run_id, detail.get("events"), detail.get("last"), detail.get("counts"))
    except (ValueError, TypeError):
        signature, message = b"", b""
    if not signature or not _verify(public, signature, message):
        problems.append("seal: signature invalid")
        return problems, None
    return problems, kid
