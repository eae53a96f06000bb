"""Small shared utilities: atomic file writes, seeding, optional-backend detection."""
