"""MLflow for fatscale: every MLflow call of the project is in this package. Training's tracking
never stalls or stops training: records are queued and delivered in the background, and what an
outage keeps out is spilled to a file and delivered later.

uri.py       where a run logs (tracking_uri), how to look at it (browse_command, run_url)
tags.py      the tag names: MLflow's system tags, fatscale's marks, a sweep's nesting
tracker.py   Tracker: rank 0's run, queued and delivered in the background; NullTracker for the other ranks
records.py   the records the queue and the spill file hold
sender.py    Sender: delivers records to a run (params, metrics, artifacts, datasets, logged models)
spill.py     the spill file: what close() could not deliver in time, and its format
client.py    the client as the above use it: HTTP bounds, run creation, which errors to retry
system.py    system metrics: rank 0's node (RunMonitor) and the other nodes' (NodeMonitor)
runs.py      one-shot operations: a sweep's parent run, a finished run's result, models' files
cli.py       ``python -m fatscale.tracking sync OUTPUT_DIR``: delivers a spill file by hand

mlflow is imported where first needed (it takes seconds): importing this package, or asking the
command for ``--help``, does not import it.
"""
