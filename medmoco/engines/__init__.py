"""Ignite engines: MoCo pretraining (and, later, supervised fine-tuning)."""
