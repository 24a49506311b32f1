"""Ignite engines: MoCo pretraining, supervised fine-tuning and evaluation, the kNN monitor, and
the parts they share (``common``)."""
