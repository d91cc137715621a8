"""MLflow's system metrics (CPU, memory, disk, network, GPUs): rank 0's node into the Tracker's run
(RunMonitor), each other node of a multi-node run into the same run (NodeMonitor)."""

from __future__ import annotations

import threading
import time

from fatscale.tracking.client import connect


def set_node_id(node_id: str) -> None:
    """Names this process's node in its system metrics (``system/<node_id>/...``); before a monitor starts."""
    from mlflow.system_metrics import set_system_metrics_node_id

    set_system_metrics_node_id(node_id)


class RunMonitor:
    """Rank 0's node, for the Tracker. MLflow's monitor thread stops for good at its first failed
    request, so the Tracker starts a new one (continuing the step count) after every outage."""

    def __init__(self, uri: str, finishing: threading.Event):
        self._uri = uri
        self._finishing = finishing  # the Tracker's close() has begun: no new monitor
        self._monitor = None  # MLflow's SystemMetricsMonitor
        self._lock = threading.Lock()

    def start(self, run_id: str) -> None:
        """A monitor of ``run_id``, in place of the one running."""
        if self._finishing.is_set():
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=self._uri)
        with self._lock:
            if self._finishing.is_set():
                return
            previous, self._monitor = self._monitor, monitor
            monitor.start()
        if previous is not None:
            previous.finish()

    def stop(self, deadline: float) -> None:
        """Stops the monitor, waiting until ``deadline`` (time.monotonic()) at most."""
        with self._lock:
            monitor, self._monitor = self._monitor, None
        if monitor is not None:
            _finish(monitor, max(0.0, deadline - time.monotonic()))  # its last samples go in while RUNNING


class NodeMonitor:
    """One more node of a multi-node run, into the run ``run_id`` that rank 0's Tracker logs (which
    monitors rank 0's node). One per node, on its local rank 0, after ``set_node_id``. Light: MLflow's
    monitor thread alone, which ends at its first failed request with MLflow's warning, so an outage
    ends this node's system metrics (rank 0's own monitor is restarted by the Tracker)."""

    def __init__(self, uri: str, run_id: str):
        connect(uri)  # the same HTTP bounds and logging as the Tracker's
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=uri)
        self._monitor.start()

    def finish(self, timeout: float) -> None:
        """Stops the monitor, waiting at most ``timeout`` s for its last request."""
        _finish(self._monitor, timeout)


def _finish(monitor, timeout: float) -> None:
    # The monitor's finish() joins its thread, which may be in a request, and then flushes: with
    # the server hanging, each takes up to MLFLOW_HTTP_REQUEST_TIMEOUT. Waited for ``timeout`` s only.
    stopping = threading.Thread(target=monitor.finish, name="mlflow-monitor-stop", daemon=True)
    stopping.start()
    stopping.join(timeout)
