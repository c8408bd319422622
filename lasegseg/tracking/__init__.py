"""MLflow: the client and its retries, the sweep's experiment and parent run, and one trial's run with its buffered
metrics. Nothing here imports Ray: the sweep, the results stage and export all reach the tracking store through it.

- ``client``: the one MLflow client, how long a call waits out an unavailable store, reachability, workers' env.
- ``store``: a new local sqlite store from its migrated template, the experiment, the parent run, the run tags.
- ``buffer``: metrics waiting for the store, mirrored to a node-local file a retried trial reads back.
- ``tracker``: :class:`~lasegseg.tracking.tracker.TrialTracker`, a trial's child run (found again on a retry),
  and the per-epoch and final metric names it logs.
"""
