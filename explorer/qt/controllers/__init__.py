"""One controller per dock: each turns its widgets' intents into jobs (through the window's
:class:`~explorer.qt.runner.JobRunner`) and the jobs' results into changes of the
:class:`~explorer.core.session.SessionModel`, and renders its widgets from the model's events.
Controllers hold no state of their own beyond the widgets they render."""

from .base import Controller, short_error
from .compare import CompareController
from .maps import MapsController
from .regions import RegionsController
from .sessions import SessionController
from .sweep import SweepController
from .tokenizer import TokenizerController
from .vlm import VlmController

__all__ = ["Controller", "short_error", "MapsController", "RegionsController", "VlmController", "CompareController",
           "SessionController", "SweepController", "TokenizerController"]
