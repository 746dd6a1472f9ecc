"""Training data on disk: pretraining token shards and packed SFT examples."""
