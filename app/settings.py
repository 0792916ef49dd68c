"""User settings: generation parameters, model options and appearance, kept in the store.

Defaults suit BitNet b1.58 2B4T (its model card samples at temperature 0.6 / top-p 0.9).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace

from engine.sampling import SamplerParams

THEMES = ("system", "light", "dark")
BACKENDS = ("auto", "native", "reference", "cuda")


@dataclass(frozen=True)
class AppSettings:
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    seed: int = -1                # -1: a fresh random seed per reply
    max_tokens: int = 1024
    n_ctx: int = 4096
    threads: int = 0              # 0: let the engine choose
    backend: str = "auto"
    theme: str = "system"
    last_model: str = ""

    def sampler_params(self) -> SamplerParams:
        return SamplerParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                             min_p=self.min_p, repeat_penalty=self.repeat_penalty,
                             seed=None if self.seed < 0 else self.seed)

    def load_options(self) -> dict:
        """What the worker needs to open a model; a change here means reloading it."""
        return {"backend": self.backend, "n_ctx": self.n_ctx, "threads": self.threads or None}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "AppSettings":
        """Unknown keys are ignored and values of the wrong type fall back to the default, so a
        settings row written by another version never stops the app from starting."""
        defaults = cls()
        clean = {}
        for f in fields(cls):
            if f.name not in values:
                continue
            value, default = values[f.name], getattr(defaults, f.name)
            if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
                clean[f.name] = float(value)
            elif type(value) is type(default):
                clean[f.name] = value
        settings = replace(defaults, **clean)
        if settings.theme not in THEMES:
            settings = replace(settings, theme="system")
        if settings.backend not in BACKENDS:
            settings = replace(settings, backend="auto")
        return settings


def max_threads() -> int:
    return os.cpu_count() or 1
