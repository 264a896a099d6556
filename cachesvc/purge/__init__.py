"""The purge half: a SpinupWP-compatible daemon that deletes nginx cache paths for PHP pools."""
