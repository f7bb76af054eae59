"""Workers drain the queue into the store in batches."""
