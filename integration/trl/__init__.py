"""TRL 1.16 adapter: the corrected loss and ClipAwareAdamW in ``GRPOTrainer`` by a one-line swap."""

from .trainer import *  # noqa: F401,F403
from .trainer import __all__  # noqa: F401
