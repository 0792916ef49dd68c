"""The left column: brand, New chat, search over titles and contents, the conversation list."""
from __future__ import annotations

import time

from PySide6.QtCore import QRect, QSize, Qt, QTimer, Signal
from PySide6.QtGui import QColor, QFont, QPainter
from PySide6.QtWidgets import (QFrame, QHBoxLayout, QLabel, QLineEdit, QListWidget, QListWidgetItem, QMenu,
                               QPushButton, QStyle, QStyledItemDelegate, QToolButton, QVBoxLayout, QWidget)

import app.qt_compat  # noqa: F401  (PySide6 6.12 emit() reference fix; before any emit)
from app.store import Conversation
from app.theme import Colors, app_icon, icon

SEARCH_DELAY_MS = 150


def age_text(timestamp: float, now: float | None = None) -> str:
    seconds = max(0.0, (now or time.time()) - timestamp)
    if seconds < 60:
        return "just now"
    for unit, size in (("min", 60), ("h", 3600), ("d", 86400)):
        if seconds < size * (60 if unit == "min" else 24 if unit == "h" else 7):
            return f"{int(seconds // size)} {unit} ago"
    return time.strftime("%d %b %Y", time.localtime(timestamp))


SUBTITLE_ROLE = Qt.UserRole + 1


class ConversationDelegate(QStyledItemDelegate):
    """Title on the first line, age in a smaller muted face below."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.text, self.muted, self.hover, self.selected = "#1B1F24", "#6B7280", "#E3E8EF", "#D9E4FB"

    def sizeHint(self, option, index) -> QSize:
        return QSize(option.rect.width(), option.fontMetrics.height() * 2 + 18)

    def paint(self, painter: QPainter, option, index) -> None:
        painter.save()
        painter.setRenderHint(QPainter.Antialiasing)
        rect = option.rect.adjusted(0, 1, 0, -1)
        if option.state & QStyle.State_Selected:
            painter.setBrush(QColor(self.selected))
        elif option.state & QStyle.State_MouseOver:
            painter.setBrush(QColor(self.hover))
        else:
            painter.setBrush(Qt.NoBrush)
        painter.setPen(Qt.NoPen)
        painter.drawRoundedRect(rect, 8, 8)
        text_rect = rect.adjusted(10, 7, -10, -7)
        font = QFont(option.font)
        font.setWeight(QFont.DemiBold if option.state & QStyle.State_Selected else QFont.Medium)
        painter.setFont(font)
        painter.setPen(QColor(self.text))
        title = painter.fontMetrics().elidedText(index.data(Qt.DisplayRole), Qt.ElideRight, text_rect.width())
        line = painter.fontMetrics().height()
        painter.drawText(QRect(text_rect.left(), text_rect.top(), text_rect.width(), line), Qt.AlignLeft, title)
        small = QFont(option.font)
        small.setPointSizeF(max(6.0, option.font.pointSizeF() - 1.5))
        painter.setFont(small)
        painter.setPen(QColor(self.muted))
        painter.drawText(QRect(text_rect.left(), text_rect.top() + line + 2, text_rect.width(), line),
                         Qt.AlignLeft, index.data(SUBTITLE_ROLE) or "")
        painter.restore()


class Sidebar(QFrame):
    new_requested = Signal()
    conversation_selected = Signal(int)
    rename_requested = Signal(int)
    delete_requested = Signal(int)
    export_requested = Signal(int, str)      # id, 'md' | 'json'
    import_requested = Signal()
    settings_requested = Signal()
    search_changed = Signal(str)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("sidebar")
        self.setFixedWidth(272)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(14, 16, 14, 10)
        layout.setSpacing(10)

        brand = QHBoxLayout()
        logo = QLabel()
        logo.setPixmap(app_icon().pixmap(QSize(30, 30)))
        brand.addWidget(logo)
        names = QVBoxLayout()
        names.setSpacing(0)
        names.addWidget(QLabel("Tern", objectName="brandLabel"))
        names.addWidget(QLabel("1.58-bit chat, offline", objectName="brandTagline"))
        brand.addLayout(names, 1)
        layout.addLayout(brand)

        self.new_button = QPushButton("New chat", objectName="newChatButton")
        self.new_button.setCursor(Qt.PointingHandCursor)
        self.new_button.clicked.connect(self.new_requested)
        layout.addWidget(self.new_button)

        self.search = QLineEdit(objectName="searchBox")
        self.search.setPlaceholderText("Search conversations")
        self.search.setClearButtonEnabled(True)
        self._search_icon = self.search.addAction(icon("search", "#888888", 16), QLineEdit.LeadingPosition)
        self._search_timer = QTimer(self, singleShot=True, interval=SEARCH_DELAY_MS)
        self._search_timer.timeout.connect(lambda: self.search_changed.emit(self.search.text()))
        self.search.textChanged.connect(lambda _: self._search_timer.start())
        layout.addWidget(self.search)

        self.list = QListWidget(objectName="conversationList")
        self.list.setContextMenuPolicy(Qt.CustomContextMenu)
        self.list.customContextMenuRequested.connect(self._context_menu)
        self.list.currentItemChanged.connect(self._current_changed)
        self.list.itemDoubleClicked.connect(lambda item: self.rename_requested.emit(item.data(Qt.UserRole)))
        self.list.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.list.setMouseTracking(True)
        self.delegate = ConversationDelegate(self.list)
        self.list.setItemDelegate(self.delegate)
        layout.addWidget(self.list, 1)

        footer = QFrame(objectName="sidebarFooter")
        row = QHBoxLayout(footer)
        row.setContentsMargins(0, 0, 0, 0)
        self.import_button = QToolButton(text="Import")
        self.import_button.setToolButtonStyle(Qt.ToolButtonTextBesideIcon)
        self.import_button.clicked.connect(self.import_requested)
        self.settings_button = QToolButton(text="Settings")
        self.settings_button.setToolButtonStyle(Qt.ToolButtonTextBesideIcon)
        self.settings_button.clicked.connect(self.settings_requested)
        row.addWidget(self.import_button)
        row.addStretch(1)
        row.addWidget(self.settings_button)
        layout.addWidget(footer)
        self._updating = False

    def set_colors(self, colors: Colors) -> None:
        dark = colors.name == "dark"
        self.delegate.text, self.delegate.muted = colors.text, colors.muted
        self.delegate.hover = "#272D35" if dark else "#E3E8EF"
        self.delegate.selected = "#2A3A58" if dark else "#D9E4FB"
        self.list.viewport().update()
        self.new_button.setIcon(icon("plus", colors.on_accent, 18))
        self._search_icon.setIcon(icon("search", colors.muted, 16))
        self.import_button.setIcon(icon("download", colors.muted, 16))
        self.settings_button.setIcon(icon("settings", colors.muted, 16))

    def show_conversations(self, conversations: list[Conversation], current_id: int | None) -> None:
        self._updating = True
        self.list.clear()
        now = time.time()
        for conv in conversations:
            item = QListWidgetItem(conv.title)
            item.setData(SUBTITLE_ROLE, age_text(conv.updated, now))
            item.setData(Qt.UserRole, conv.id)
            item.setToolTip(conv.title)
            self.list.addItem(item)
            if conv.id == current_id:
                self.list.setCurrentItem(item)
        self._updating = False

    def _current_changed(self, item: QListWidgetItem | None, _previous) -> None:
        if item is not None and not self._updating:
            self.conversation_selected.emit(item.data(Qt.UserRole))

    def _context_menu(self, pos) -> None:
        item = self.list.itemAt(pos)
        if item is None:
            return
        cid = item.data(Qt.UserRole)
        menu = QMenu(self)
        menu.addAction("Rename…", lambda: self.rename_requested.emit(cid))
        menu.addAction("Export as Markdown…", lambda: self.export_requested.emit(cid, "md"))
        menu.addAction("Export as JSON…", lambda: self.export_requested.emit(cid, "json"))
        menu.addSeparator()
        menu.addAction("Delete…", lambda: self.delete_requested.emit(cid))
        menu.exec(self.list.viewport().mapToGlobal(pos))
