"""`python -m app` (and the `tern` command): open the window.

    python -m app [FILE.gguf] [--model F] [--theme light|dark]
    python -m app --self-test [--json]      (the bundle: Tern --self-test)
    python -m app --screenshot OUT.png --model F --message TEXT [--theme light|dark]
        opens the window, sends TEXT, waits for the whole reply, saves a screenshot, exits
        (works under Xvfb or QT_QPA_PLATFORM=offscreen).
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

log = logging.getLogger("app")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tern", description="Tern: offline chat with ternary language models")
    parser.add_argument("file", nargs="?", help="a .gguf file to open (what a double-click on one passes)")
    parser.add_argument("--model", help="a .gguf model to load at start")
    parser.add_argument("--self-test", action="store_true",
                        help="check the kernels and a tiny model on this CPU (no screen, no network), then exit")
    parser.add_argument("--json", action="store_true", help="with --self-test: one JSON object")
    parser.add_argument("--theme", choices=("system", "light", "dark"), help="override the theme setting")
    parser.add_argument("--message", action="append", default=[],
                        help="send this message once the model is loaded (repeat for several turns)")
    parser.add_argument("--system", help="system prompt of the conversation the messages go to")
    parser.add_argument("--conversation", type=int, help="open this conversation id (default: a new one "
                                                         "when messages are given)")
    parser.add_argument("--max-tokens", type=int, help="override the max reply tokens setting")
    parser.add_argument("--backend", choices=("auto", "native", "cuda", "reference"),
                        help="override the backend setting (BitNet models)")
    parser.add_argument("--screenshot", type=Path, help="save a window screenshot after the replies, then exit")
    parser.add_argument("--size", default="1180x780", help="window size for screenshots, WxH")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up on a screenshot run after this many s")
    parser.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.self_test:
        from engine.cli import main as engine_main
        return engine_main(["selftest", *(["--json"] if args.json else [])])
    from PySide6.QtWidgets import QApplication, QMessageBox

    from app.controller import ChatController
    from app.main_window import MainWindow
    from app.settings import AppSettings
    from app.store import Store, StoreError
    from app.worker import EngineHost

    app = QApplication(sys.argv[:1])
    app.setApplicationName("Tern")
    app.setApplicationDisplayName("Tern")
    app.setDesktopFileName("tern")
    try:
        store = Store.open_default()
    except StoreError as exc:
        QMessageBox.critical(None, "Tern cannot start", str(exc))
        return 1
    settings = AppSettings.from_dict(store.settings())
    if args.theme:
        settings = replace(settings, theme=args.theme)
    if args.max_tokens:
        settings = replace(settings, max_tokens=args.max_tokens)
    if args.backend:
        settings = replace(settings, backend=args.backend)
    host = EngineHost()
    controller = ChatController(store, host, settings)
    window = MainWindow(controller)
    if args.screenshot:
        width, height = (int(v) for v in args.size.lower().split("x"))
        window.resize(width, height)
    window.show()
    script = None
    if args.message or args.screenshot:
        from app.script import ScriptedRun
        script = ScriptedRun(window, args)
        script.start()
    else:
        model = args.model or _startup_model(settings)
        if args.conversation:
            controller.open_conversation(args.conversation)
        if model:
            controller.load_model(model)
        else:
            window.load_default_model = True
        if args.file:
            controller.inspect(str(Path(args.file).resolve()))
    code = app.exec()
    store.close()
    return script.exit_code if script is not None else code


def _startup_model(settings) -> str | None:
    """The model used last time, if it is still there."""
    if settings.last_model and Path(settings.last_model).is_file():
        return settings.last_model
    return None


if __name__ == "__main__":
    sys.exit(main())
