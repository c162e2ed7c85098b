"""The domain and the store: events, the job state machine, credits rules, the event store."""
