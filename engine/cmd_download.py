"""`python -m engine download [REPO [FILE]]`: fetch a model from the Hugging Face hub (or the
HF_ENDPOINT mirror) into the library, with a terminal progress bar. Default: BitNet b1.58 2B4T.
Ctrl-C leaves a partial file that the same command resumes."""
from __future__ import annotations

import argparse
import getpass
import sys

from engine import hub, secrets
from engine.download import TerminalProgressBar
from engine.errors import DownloadError
from engine.library import (
    DEFAULT_FILE,
    DEFAULT_REPO,
    Library,
    install_converted,
    install_from_hub,
    load_catalogue,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "download", help="download a model from Hugging Face into the library",
        description="Download a GGUF model (default: microsoft/bitnet-b1.58-2B-4T-gguf, "
                    "ggml-model-i2_s.gguf), verify its SHA-256 and add it to the library. A BitNet "
                    "safetensors repository is downloaded and converted to GGUF. Interrupted "
                    "downloads resume. HF_ENDPOINT selects a mirror.")
    p.add_argument("repo", nargs="?", metavar="REPO", help="owner/name on the hub")
    p.add_argument("file", nargs="?", metavar="FILE", help="file in the repository (a .gguf)")
    p.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    p.add_argument("--format", default="i2_s", help="GGUF format when converting safetensors (default: i2_s)")
    p.add_argument("--token", action="store_true",
                   help="ask for a Hugging Face token (for gated models) and keep it in the system keychain")
    p.add_argument("--forget-token", action="store_true", help="remove the stored token and stop")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.forget_token:
        secrets.clear_token()
        _say("the Hugging Face token was removed")
        return 0
    if args.token:
        _ask_token()
    token = secrets.get_token()
    repo = args.repo or DEFAULT_REPO
    filename = args.file or (DEFAULT_FILE if args.repo is None else None)
    library = Library()
    bar = TerminalProgressBar(filename or repo, file=sys.stderr)
    try:
        if filename is None:
            filename = _pick_file(repo, args.revision, token)
        if filename is None:
            bar.set_description(f"{repo} (convert)")
            entry = install_converted(repo, args.format, args.revision, token=token, progress=bar,
                                      library=library)
        else:
            entry = install_from_hub(repo, filename, args.revision, token=token, progress=bar, library=library)
    except KeyboardInterrupt:
        bar.close()
        _say("\ninterrupted: the partial file is kept — run the same command again to resume")
        return 130
    finally:
        bar.close()
    _say(f"{entry.name}: {entry.quant}, {entry.size / 1e9:.2f} GB, in {entry.path}")
    return 0


def _pick_file(repo: str, revision: str, token: str | None) -> str | None:
    """The file to fetch when only a repository is named: the catalogue's, the only GGUF, or
    None for a safetensors checkpoint to convert."""
    for model in load_catalogue():
        if model["repo"] == repo and model["route"] == "gguf":
            return model["file"]
        if model["repo"] == repo and model["route"] == "convert":
            return None
    files = hub.repo_files(repo, revision, token=token)
    ggufs = [f.path for f in files if f.path.endswith(".gguf")]
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        listing = "\n  ".join(ggufs)
        raise DownloadError(f"{repo} has {len(ggufs)} GGUF files; name one:\n  {listing}\n"
                            f"e.g. python -m engine download {repo} {ggufs[0]}")
    if any(f.path.endswith(".safetensors") for f in files):
        return None
    raise DownloadError(f"{repo} has no GGUF file and no safetensors checkpoint")


def _ask_token() -> None:
    prompt = "Hugging Face token (input hidden): "
    token = getpass.getpass(prompt) if sys.stdin.isatty() else sys.stdin.readline()
    try:
        where = secrets.set_token(token)
    except secrets.KeychainUnavailableError as exc:
        _say(f"{exc}\nUsing the token for this run only.")
        where = secrets.set_token(token, session_only=True)
    _say("token stored in the system keychain" if where == "keychain" else "token kept for this run only")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
