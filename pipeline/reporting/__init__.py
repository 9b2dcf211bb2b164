"""What a person reads: the run summary, its figures and the technique ledger."""
