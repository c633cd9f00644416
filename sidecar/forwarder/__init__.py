"""Stage 4: batches from the spool to PrecogX, with retry, pacing and dead letters."""
