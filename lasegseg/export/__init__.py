"""Use a trained model: predict new volumes (and, with a sweep, export the best run)."""
