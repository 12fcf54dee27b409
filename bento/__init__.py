"""The serving stage: a BentoML service with generation logging and feedback (later issue)."""
