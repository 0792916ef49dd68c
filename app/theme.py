"""Light and dark themes: a style sheet per theme (resources/styles/*.qss), the matching QPalette
for the widgets a style sheet does not reach, and tinted SVG icons. 'system' follows the
desktop's colour scheme and switches when it changes."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

from PySide6.QtCore import QByteArray, QSize, Qt
from PySide6.QtGui import QColor, QGuiApplication, QIcon, QImage, QPainter, QPalette, QPixmap
from PySide6.QtSvg import QSvgRenderer
from PySide6.QtWidgets import QApplication

from engine.paths import resource_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Colors:
    name: str
    bg: str
    surface: str
    text: str
    muted: str
    accent: str
    on_accent: str
    link: str
    code_text: str
    selection: str


LIGHT = Colors("light", bg="#F7F8FA", surface="#FFFFFF", text="#1B1F24", muted="#6B7280", accent="#2D6BE3",
               on_accent="#FFFFFF", link="#2459C2", code_text="#1F2937", selection="#BFD3FA")
DARK = Colors("dark", bg="#15181D", surface="#1F242B", text="#E6E8EB", muted="#9AA3AE", accent="#4C8DFF",
              on_accent="#FFFFFF", link="#7EAEFF", code_text="#D8DEE6", selection="#34538C")
THEMES = {"light": LIGHT, "dark": DARK}


def system_scheme() -> str:
    """'dark' or 'light' as the desktop reports it (light when it does not say)."""
    hints = QGuiApplication.styleHints()
    return "dark" if hints.colorScheme() == Qt.ColorScheme.Dark else "light"


def resolve(choice: str) -> Colors:
    return THEMES.get(choice) or THEMES[system_scheme()]


def apply_theme(app: QApplication, choice: str) -> Colors:
    """Style, palette and style sheet for `choice` ('system' | 'light' | 'dark')."""
    colors = resolve(choice)
    app.setStyle("Fusion")
    app.setPalette(_palette(colors))
    path = resource_path(f"styles/{colors.name}.qss")
    try:
        icons = resource_path("icons").as_posix()
        app.setStyleSheet(path.read_text(encoding="utf-8").replace("@ICONS@", icons))
    except OSError as exc:  # a missing style sheet leaves a plain but working window
        log.error("cannot read the style sheet %s: %s", path, exc)
    return colors


def _palette(c: Colors) -> QPalette:
    p = QPalette()
    roles = {
        QPalette.Window: c.bg, QPalette.Base: c.surface, QPalette.AlternateBase: c.bg,
        QPalette.Text: c.text, QPalette.WindowText: c.text, QPalette.ButtonText: c.text,
        QPalette.Button: c.surface, QPalette.ToolTipBase: c.surface, QPalette.ToolTipText: c.text,
        QPalette.Highlight: c.selection, QPalette.HighlightedText: c.text, QPalette.Link: c.link,
        QPalette.PlaceholderText: c.muted, QPalette.BrightText: c.on_accent,
    }
    for role, value in roles.items():
        p.setColor(role, QColor(value))
    p.setColor(QPalette.Disabled, QPalette.Text, QColor(c.muted))
    p.setColor(QPalette.Disabled, QPalette.ButtonText, QColor(c.muted))
    return p


@lru_cache(maxsize=256)
def icon(name: str, color: str, size: int = 20) -> QIcon:
    """resources/icons/NAME.svg with `currentColor` painted in `color`, sharp on HiDPI screens."""
    try:
        svg = resource_path(f"icons/{name}.svg").read_text(encoding="utf-8").replace("currentColor", color)
    except OSError as exc:
        log.error("missing icon %s: %s", name, exc)
        return QIcon()
    renderer = QSvgRenderer(QByteArray(svg.encode("utf-8")))
    result = QIcon()
    for scale in (1, 2):
        image = QImage(QSize(size * scale, size * scale), QImage.Format_ARGB32_Premultiplied)
        image.fill(Qt.transparent)
        painter = QPainter(image)
        renderer.render(painter)
        painter.end()
        pixmap = QPixmap.fromImage(image)
        pixmap.setDevicePixelRatio(scale)
        result.addPixmap(pixmap)
    return result


def app_icon() -> QIcon:
    return QIcon(str(resource_path("icons/tern.svg")))
