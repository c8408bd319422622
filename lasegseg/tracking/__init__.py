"""MLflow: the client, its retries, the sqlite store, and one trial's run with its buffered metrics.

Nothing here imports Ray: the sweep, the results stage and export all reach the tracking store through it.
"""
