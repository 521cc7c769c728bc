"""Root causes, by test id, of every outcome that differs between the stock and swapped runs (``DIFFERENCES``:
test -> (category, cause)) and of every failure common to both (``BOTH``: test -> cause).

A difference missing here is reported as "unexplained" with the swap's error message, so a new one cannot
hide. Categories: "intended" (the test asserts TRL behaviour the swap changes on purpose), "adapter" (the
adapter is wrong or lacks the feature), "harness" (the tiny local models, not the product).
"""

from __future__ import annotations

DIFFERENCES: dict[str, tuple[str, str]] = {}

BOTH: dict[str, str] = {}
