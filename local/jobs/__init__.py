"""Job handlers: steps that run as child processes with the container contract re-rooted
(container: shared helpers; processing, training, tuning: one step type each)."""
