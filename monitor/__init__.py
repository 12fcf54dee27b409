"""The monitoring stage: the monitoring store (monitor/store.py: generation log and feedback behind SQLAlchemy),
then Evidently reports, the retraining policy and the scheduler (later issue)."""
