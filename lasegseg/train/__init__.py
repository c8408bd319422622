"""One trial: fit → validate each epoch → best checkpoint → test metrics. No ray or mlflow imports here."""
