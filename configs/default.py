"""The documented base configuration (see `jaxdpdm/config.py` for every field).

Usage: `python -m jaxdpdm.main --config=configs/default.py --workdir=DIR`.
"""

from jaxdpdm.config import get_config  # noqa: F401  (ml_collections loads `get_config` from here)
