"""The Gradio app (``python app.py``): upload a subject, train methods, compare them."""

from .forms import UploadError, check_uploads, option_specs
from .jobs import Job, JobQueue
from .studio import TINY, TOY, ModelError, Studio, resolve_model
from .ui import App

__all__ = ["App", "Job", "JobQueue", "ModelError", "Studio", "TINY", "TOY", "UploadError", "check_uploads",
           "option_specs", "resolve_model"]
