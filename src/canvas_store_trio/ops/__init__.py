"""Running it in production: Prometheus metrics, health and readiness, the admin API."""

from ._admin import ADMIN_TOKEN_ENV as ADMIN_TOKEN_ENV
from ._admin import AdminAPI as AdminAPI
from ._metrics import ManagerCollector as ManagerCollector
from ._metrics import metrics_registry as metrics_registry
from ._metrics import metrics_text as metrics_text
from ._metrics import watch_loop_lag as watch_loop_lag
from ._routes import ops_http_handler as ops_http_handler
