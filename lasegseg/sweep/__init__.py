"""Ray Tune + MLflow glue: search space, trainable, tracking, resume and aggregation of trials over seeds."""
