"""Data: layouts → validated cases → canonical orientation → normalised axial slices in an Arrow cache."""
