"""The monitoring stage: Evidently reports, retraining policy and scheduler (later issue)."""
