"""Many assets on many machines (`text3d batch`): one generate run per prompt as a Ray task; optional extra `.[ray]`."""
